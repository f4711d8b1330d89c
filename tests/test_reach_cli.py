"""The agent's reach options as a user types them: gateway URLs and proxies that are wrong are
usage errors (exit 2) with a message naming the bad text, before anything is dialled; the
[agent] file takes the same keys; and the example configs agree on the listeners' ports."""

import configparser
import re
import subprocess
from pathlib import Path

import pytest

from diglett.cli import agent as agent_cli
from tests.harness import command

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "etc" / "examples"


def run_agent(tmp_path, *args, env=None):
    key = tmp_path / "agent.key"
    if not key.exists():
        subprocess.run(command("diglett") + ["keygen", "--key-file", str(key)], check=True,
                       capture_output=True, timeout=20)
    argv = command("diglett") + ["-n", "foo", "--key-file", str(key), "--server-key",
                                 "02" + "ab" * 32, *args, "127.0.0.1:8080"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20,
                          env=dict(env or {}, PATH="/usr/bin:/bin"))


@pytest.mark.parametrize("gateway, words", [
    ("ftp://gw.example.com", "unknown scheme 'ftp'"),
    ("gw.example.com", "missing :PORT"),
    ("tls://gw.example.com/diglett", "a path needs ws:// or wss://"),
])
def test_a_bad_gateway_url_is_a_usage_error(tmp_path, gateway, words):
    result = run_agent(tmp_path, "-g", gateway)
    assert result.returncode == 2
    assert words in result.stderr


def test_a_bad_proxy_in_the_environment_is_a_usage_error_without_its_password(tmp_path):
    result = run_agent(tmp_path, "-g", "wss://gw.example.com/diglett",
                       env={"https_proxy": "ftp://alice:hunter2@proxy:21"})
    assert result.returncode == 2
    assert "https_proxy: unsupported proxy scheme 'ftp'" in result.stderr
    assert "hunter2" not in result.stderr


def test_the_agent_file_takes_gateway_urls_and_a_proxy(tmp_path):
    path = tmp_path / "agent.conf"
    path.write_text("[agent]\ngateway = wss://gw.example.com/diglett, gw.example.com:20000\n"
                    "proxy = http://alice:s3cret@proxy.corp.example:3128\nname = foo\n"
                    "backend = 127.0.0.1:8080\n")
    settings = agent_cli.settings(agent_cli.run_parser().parse_args(["-c", str(path)]))
    assert settings["proxy"] == "http://alice:s3cret@proxy.corp.example:3128"
    flag = agent_cli.settings(agent_cli.run_parser().parse_args(
        ["-c", str(path), "--proxy", "none"]))
    assert flag["proxy"] == "none"  # the flag wins over the file


def test_the_examples_point_traefik_at_the_servers_listeners():
    server = configparser.ConfigParser(inline_comment_prefixes=("#",))
    server.read(EXAMPLES / "diglett.conf")
    routes = (EXAMPLES / "traefik-agents.yml").read_text()
    assert 'address: "%s"' % server["server"]["listen_tls"] in routes
    assert 'url: "http://%s"' % server["server"]["listen_ws"] in routes
    assert "passthrough: true" in routes
    static = (EXAMPLES / "traefik.yml").read_text()
    assert re.search(r"^    filename: /etc/traefik/diglett-agents.yml$", static, re.M)
