"""The systemd units in etc/systemd/: they verify, carry the hardening the operations issue names,
stop the agent on its permanent exit codes, and the programs run under their sandbox.

`systemd-analyze verify` needs Debian's systemd package (scripts/bootstrap --test installs it),
not a running systemd. Running the server in a real transient unit needs a system manager
(`systemd-run`); where there is none (a container), that test is skipped with the reason, and
MemoryDenyWriteExecute=, the option most likely to break Python, is still checked by starting
server and agent under the same seccomp rule (tests/seccomp_mdwe.py).
"""

import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from diglett import agent as agent_module
from diglett import config
from diglett.cli import agent as agent_cli
from tests.support import harness

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "etc" / "systemd"
SERVER_UNIT = UNITS / "diglett-server.service"
AGENT_UNIT = UNITS / "diglett-agent@.service"
EXAMPLE_AGENT_CONFIG = ROOT / "etc" / "examples" / "agent-foo.conf"
OPERATIONS = ROOT / "docs" / "operations.md"
INSTALLED_BIN = "/usr/local/bin/"
MDWE_LAUNCHER = Path(__file__).resolve().parents[1] / "support" / "seccomp_mdwe.py"

# What issue 4 and the operations brief ask of both units, exactly.
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "LimitNOFILE": "65536",
    "Restart": "on-failure",
}
SERVER_SPECIFIC = {
    "Type": "notify",
    "FileDescriptorStoreMax": "16384",
    "ExecStart": INSTALLED_BIN + "diglett-server -c /etc/diglett.conf",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "User": "diglett",
    "Group": "diglett",
    "StateDirectory": "diglett",
}
AGENT_SPECIFIC = {
    "ExecStart": INSTALLED_BIN + "diglett -c /etc/diglett/agent-%i.conf",
    "RestartSec": "5",
    "DynamicUser": "yes",
    "StateDirectory": "diglett-agent/%i",
}
# Keys of the server unit that are about running it, not about its sandbox.
NOT_SANDBOX = {"Type", "FileDescriptorStoreMax", "ExecStart", "ExecReload", "TimeoutStopSec", "Restart", "RestartSec",
               "User", "Group", "StateDirectory"}


def parse_unit(path):
    """{section: {key: [values]}} of a unit file; comments and blank lines dropped."""
    sections = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(path):
    """The [Service] section as {key: last value}, as systemd reads a key set once."""
    return {key: values[-1] for key, values in parse_unit(path)["Service"].items()}


def sandbox_lines(path):
    """The unit's lines after its '--- sandbox' comment, comments left out."""
    text = path.read_text().split("# --- sandbox", 1)[1].split("\n[", 1)[0]
    return [line for line in text.splitlines()[1:] if line and not line.startswith("#")]


def permanent_exit_codes():
    return sorted(value for name, value in vars(agent_module).items()
                  if name.startswith("EXIT_") and value != agent_module.EXIT_OK)


# ----- systemd-analyze verify --------------------------------------------------------------------
def installed_copies(directory):
    """The units with ExecStart pointing at this venv's scripts (verify needs real binaries),
    plus the instance diglett-agent@foo.service, so %i is expanded and checked too."""
    for unit in (SERVER_UNIT, AGENT_UNIT):
        text = unit.read_text().replace(INSTALLED_BIN, str(harness.BIN) + "/")
        (directory / unit.name).write_text(text)
    shutil.copy(directory / AGENT_UNIT.name, directory / "diglett-agent@foo.service")
    return [directory / name for name in
            (SERVER_UNIT.name, AGENT_UNIT.name, "diglett-agent@foo.service")]


def test_the_venv_has_the_scripts_the_units_run():
    for name in ("diglett", "diglett-server"):
        assert (harness.BIN / name).exists(), "%s is not installed in %s" % (name, harness.BIN)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing: install Debian's systemd package "
                    "(scripts/bootstrap --test does)")
def test_systemd_analyze_verify_passes_without_a_warning(tmp_path):
    units = installed_copies(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=30)
    # verify exits 0 on an unknown key or a bad value, only printing a warning: none allowed.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing: install Debian's systemd package")
def test_verify_would_catch_a_misspelt_option(tmp_path):
    """The check above can fail: a typo in a copy of the unit is reported."""
    server = installed_copies(tmp_path)[0]
    server.write_text(server.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    result = subprocess.run(["systemd-analyze", "verify", str(server)],
                            capture_output=True, text=True, timeout=30)
    assert "Unknown key 'ProtectHomes'" in result.stderr, result.stderr


# ----- the options, by name --------------------------------------------------------------------
@pytest.mark.parametrize("unit, specific", [(SERVER_UNIT, SERVER_SPECIFIC),
                                            (AGENT_UNIT, AGENT_SPECIFIC)],
                         ids=["server", "agent"])
def test_unit_has_every_named_option(unit, specific):
    options = service(unit)
    expected = {**HARDENING, **specific}
    wrong = {key: (options.get(key), value) for key, value in expected.items()
             if options.get(key) != value}
    assert not wrong, "%s: {key: (found, expected)}: %s" % (unit.name, wrong)


def test_both_units_share_one_sandbox():
    assert sandbox_lines(SERVER_UNIT) == sandbox_lines(AGENT_UNIT)
    assert set(HARDENING) - {"UMask", "LimitNOFILE", "Restart"} <= {
        line.partition("=")[0] for line in sandbox_lines(SERVER_UNIT)}


def test_the_agent_waits_for_the_network():
    unit = parse_unit(AGENT_UNIT)["Unit"]
    assert unit["After"] == ["network-online.target"]
    assert unit["Wants"] == ["network-online.target"]


def test_agent_is_not_restarted_after_a_permanent_exit_code():
    codes = [int(code) for code in service(AGENT_UNIT)["RestartPreventExitStatus"].split()]
    assert codes == permanent_exit_codes() == [2, 3, 4, 5, 6, 7, 8, 9]


def test_operations_doc_lists_every_exit_code():
    text = OPERATIONS.read_text()
    for code in [agent_module.EXIT_OK, *permanent_exit_codes()]:
        assert re.search(r"^\| %d \|" % code, text, re.M), "exit code %d not in the table" % code


# ----- the example agent config ----------------------------------------------------------------
def test_example_agent_config_loads_and_fits_the_unit():
    values = config.load_agent(EXAMPLE_AGENT_CONFIG)
    assert set(values) <= set(agent_cli.OPTIONS)
    args = agent_cli.run_parser().parse_args(["-c", str(EXAMPLE_AGENT_CONFIG)])
    settings = agent_cli.settings(args)  # the required keys are all there
    agent_cli.host_port(settings["gateway"], "--gateway")
    agent_cli.host_port(settings["backend"], "BACKEND")
    # What the unit of instance foo can write: its state directory.
    state = Path("/var/lib") / service(AGENT_UNIT)["StateDirectory"].replace("%i", "foo")
    assert Path(settings["key-file"]).parent == state
    assert Path(settings["known-servers"]).parent == state
    assert EXAMPLE_AGENT_CONFIG.name == Path(
        service(AGENT_UNIT)["ExecStart"].split()[-1].replace("%i", "foo")).name


# ----- running under the sandbox -----------------------------------------------------------------
def run_mdwe(*argv):
    return subprocess.run([sys.executable, str(MDWE_LAUNCHER), *argv], capture_output=True,
                          text=True, timeout=30)


def test_server_and_agent_run_under_memory_deny_write_execute(tmp_path, monkeypatch,
                                                              echo_backend):
    """MemoryDenyWriteExecute=yes breaks code that makes writable+executable memory (cffi's
    ffi.callback, gevent's libuv loop): the server and the agent carry data under it."""
    probe = ("import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=7)\nexcept PermissionError:\n"
             "    print('refused')")
    control = run_mdwe(sys.executable, "-c", probe)
    if control.returncode == 125:
        pytest.skip(control.stderr.strip())
    assert control.stdout.strip() == "refused", "the filter does not work: %s" % control.stderr

    original = harness.command
    monkeypatch.setattr(harness, "command",
                        lambda name: [sys.executable, str(MDWE_LAUNCHER), *original(name)])
    gateway = harness.Gateway(tmp_path).start()
    agent = gateway.agent("foo", echo_backend.address)
    for proc in (gateway.proc, agent):
        status = Path("/proc/%d/status" % proc.pid).read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "%s is not filtered" % proc.label
    payload = harness.pattern(1 << 20, b"mdwe")
    with harness.connect(agent.port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert harness.recv_all(sock) == (harness.sha256_of_pattern(1 << 20, b"mdwe"), 1 << 20)
    assert agent.stop() == agent_module.EXIT_OK
    assert gateway.proc.stop() == 0
    assert "MemoryError" not in gateway.proc.stderr() + agent.stderr()


def systemd_run_problem():
    """None if transient system units can be started here, else why not."""
    if shutil.which("systemd-run") is None:
        return "systemd-run is missing"
    try:
        result = subprocess.run(["systemd-run", "--wait", "--pipe", "--quiet",
                                 "-p", "DynamicUser=yes", "true"],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "systemd-run did not answer within 30 s"
    if result.returncode != 0:
        return "systemd-run cannot start a unit here (%s)" % " ".join(result.stderr.split())
    return None


def test_server_runs_in_a_transient_unit_with_the_units_sandbox(tmp_path):
    """The server unit's sandbox options, as a transient unit with a dynamic user and its own
    state directory (the test machine has no diglett user): it starts, listens and stops."""
    problem = systemd_run_problem()
    if problem:
        pytest.skip(problem + "; MemoryDenyWriteExecute is covered by the seccomp test above")
    name = "diglett-test-%s" % uuid.uuid4().hex[:8]
    run_dir = Path("/run") / name  # readable in the sandbox: not hidden by PrivateTmp
    run_dir.mkdir(mode=0o755)
    conf = run_dir / "diglett.conf"
    conf.write_text("[server]\nlisten = 127.0.0.1:0\nhttp = 127.0.0.1:0\n"
                    "domain = example.test\nkey = /var/lib/%s/server.key\n"
                    "database = /var/lib/%s/registry.db\n" % (name, name))
    conf.chmod(0o644)
    properties = ["%s=%s" % item for item in service(SERVER_UNIT).items()
                  if item[0] not in NOT_SANDBOX]
    properties += ["DynamicUser=yes", "StateDirectory=%s" % name]
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--unit", name]
    for prop in properties:
        argv += ["-p", prop]
    argv += [str(harness.BIN / "diglett-server"), "-c", str(conf)]
    proc = harness.Proc(argv, tmp_path, "systemd-run")
    try:
        match = proc.wait_for(harness.READY, timeout=30)
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=5):
            pass
        subprocess.run(["systemctl", "stop", name + ".service"], timeout=30, check=True)
        assert proc.wait(30) == 0, proc.stderr()
    finally:
        subprocess.run(["systemctl", "stop", name + ".service"], capture_output=True,
                       timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)
        for state in (Path("/var/lib/private") / name, Path("/var/lib") / name):
            if state.is_symlink():
                state.unlink()
            else:
                shutil.rmtree(state, ignore_errors=True)
