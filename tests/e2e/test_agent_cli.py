"""The command lines as a user types them: versions, keygen and pubkey, key file modes,
BACKEND versus subcommands, the agent's config file, `diglett-server --check`, and the reach
options (gateway URLs and proxies that are wrong are usage errors, exit 2, naming the bad
text before anything is dialled; the [agent] file takes the same keys).

Real console scripts of this venv as subprocesses; a gateway only where a tunnel must come up."""

import configparser
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from diglett import __version__
from diglett.cli import agent as agent_cli
from tests.support.harness import Agent, command

pytestmark = pytest.mark.timeout(30)


PUBLIC_KEY = re.compile(r"\A(02|03)[0-9a-f]{64}\Z")
EXIT_USAGE = 2


def run(name, *args, cwd=None):
    return subprocess.run(command(name) + [str(a) for a in args], capture_output=True,
                          text=True, timeout=20, cwd=cwd)


def keygen(path):
    result = run("diglett", "keygen", "--key-file", path)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# ----- versions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["diglett", "diglett-server", "diglett-admin"])
def test_version_is_the_one_in_the_package(name):
    result = run(name, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "%s %s" % (name, __version__)


# ----- keys --------------------------------------------------------------------------------------
def test_keygen_creates_a_private_file_and_prints_the_public_key(tmp_path):
    path = tmp_path / "sub" / "agent.key"
    public = keygen(path)
    assert PUBLIC_KEY.match(public), public
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public not in path.read_text()  # the file holds the secret, not the public key


def test_keygen_refuses_to_overwrite(tmp_path):
    path = tmp_path / "agent.key"
    keygen(path)
    before = path.read_bytes()
    result = run("diglett", "keygen", "--key-file", path)
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert result.stdout == ""
    assert path.read_bytes() == before


def test_pubkey_prints_the_key_keygen_printed(tmp_path):
    path = tmp_path / "agent.key"
    public = keygen(path)
    result = run("diglett", "pubkey", "--key-file", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == public


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "agent.key"
    public = keygen(path)
    path.chmod(0o644)
    result = run("diglett", "pubkey", "--key-file", path)
    assert result.returncode != 0 and public not in result.stdout
    assert "chmod 600" in result.stderr
    agent = run("diglett", "-g", "127.0.0.1:9", "-n", "foo", "--key-file", path,
                "--server-key", public, "127.0.0.1:80")
    assert agent.returncode == EXIT_USAGE
    assert "chmod 600" in agent.stderr


def test_pubkey_without_a_key_file_says_how_to_make_one(tmp_path):
    result = run("diglett", "pubkey", "--key-file", tmp_path / "missing.key")
    assert result.returncode != 0
    assert "keygen" in result.stderr


# ----- BACKEND and the agent's config file -----------------------------------------------------
def start(gateway, *args, label):
    return Agent(command("diglett") + [str(a) for a in args], gateway.workdir, label)


@pytest.mark.timeout(40)
def test_a_backend_is_never_taken_for_a_subcommand(gateway):
    key, public = gateway.new_key("web")
    gateway.grant("web", public)
    agent = start(gateway, "127.0.0.1:80", "-g", gateway.gateway, "-n", "web",
                  "--key-file", key, "--server-key", gateway.key, label="backend-first")
    agent.wait_up()
    assert "tunnel up: web.example.test -> 127.0.0.1:80 " in agent.stdout()
    for word in ("keygen", "pubkey"):  # a subcommand is only ever the first word
        result = run("diglett", "-g", gateway.gateway, "--key-file", key, "-n", "web", word)
        assert result.returncode == EXIT_USAGE
        assert "BACKEND" in result.stderr


def write_agent_conf(path, **values):
    lines = ["# written by the test", "[agent]"]
    lines += ["%s = %s" % (key.replace("_", "-"), value) for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.timeout(40)
def test_agent_config_file_works_and_flags_override_it(gateway, echo_backend):
    key, public = gateway.new_key("conf")
    gateway.grant("conf", public)
    (gateway.workdir / "etc").mkdir()
    conf = write_agent_conf(
        gateway.workdir / "etc" / "agent.conf", gateway=gateway.gateway, name="conf",
        key_file="../" + key.name, server_key=gateway.key,  # relative to the file's folder
        backend="127.0.0.1:%d" % echo_backend.address[1])
    agent = start(gateway, "-c", conf, label="from-conf")
    agent.wait_up()
    assert agent.host == "conf.example.test"
    assert agent.stop() == 0

    other_key, other_public = gateway.new_key("flag")
    gateway.grant("flag", other_public)
    override = start(gateway, "-c", conf, "-n", "flag", "--key-file", other_key,
                     "127.0.0.1:81", label="flags-win")
    override.wait_up()
    assert "tunnel up: flag.example.test -> 127.0.0.1:81 " in override.stdout()


def test_unknown_key_in_the_agent_config_exits_2_naming_file_and_line(tmp_path):
    conf = write_agent_conf(tmp_path / "agent.conf", gateway="127.0.0.1:9", name="foo",
                            sever_key="02" + "11" * 32, backend="127.0.0.1:80")
    result = run("diglett", "-c", conf)
    assert result.returncode == EXIT_USAGE
    assert "%s:5" % conf in result.stderr, result.stderr
    assert "sever-key" in result.stderr


# ----- diglett-server --check --------------------------------------------------------------------
def test_server_check_accepts_a_good_config(tmp_path):
    conf = tmp_path / "server.conf"
    conf.write_text("[server]\nlisten = 127.0.0.1:0\nhttp = 127.0.0.1:0\ndomain = example.test\n"
                    "key = server.key\ndatabase = registry.db\n")
    result = run("diglett-server", "-c", conf, "--check")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "server.key").exists()  # --check starts nothing, creates nothing
    assert not (tmp_path / "registry.db").exists()


def test_server_check_names_the_bad_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[server]\ndomain = example.test\nlisten = 127.0.0.1:notaport\n")
    result = run("diglett-server", "-c", conf, "--check")
    assert result.returncode != 0
    assert "%s:3" % conf in result.stderr, result.stderr
    assert "listen" in result.stderr


def test_the_reference_config_passes_check():
    reference = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "etc", "diglett.conf")
    result = run("diglett-server", "-c", reference, "--check")
    assert result.returncode == 0, result.stderr


ROOT = Path(__file__).resolve().parents[2]
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
