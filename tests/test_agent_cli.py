"""The command lines as a user types them: versions, keygen and pubkey, key file modes,
BACKEND versus subcommands, the agent's config file, and `diglett-server --check`.

Real console scripts of this venv as subprocesses; a gateway only where a tunnel must come up.
"""

import os
import re
import stat
import subprocess

import pytest

from diglett import __version__
from tests.harness import Agent, command

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
    reference = os.path.join(os.path.dirname(__file__), os.pardir, "etc", "diglett.conf")
    result = run("diglett-server", "-c", reference, "--check")
    assert result.returncode == 0, result.stderr
