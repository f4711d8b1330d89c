"""Enrolment end to end with real processes: `diglett-admin invite` prints a code, `diglett
enroll CODE` in a fresh home directory makes the key, pins the server key and binds the grant,
and `diglett -n foo BACKEND` then needs no other flag. A used, expired, damaged or forged code
is refused with the reason (and an admission penalty), and nothing is granted or pinned for it.
"""

import dataclasses
import json
import os
import subprocess
import urllib.request

import pytest

from diglett import crypto, invitecode
from tests.support import harness
from tests.support.harness import Agent, Backend, Gateway, command, connect, echo, recv_exact
from tests.support.reachfixtures import reach_gateway

APR1 = "$apr1$diglett1$" + "b" * 22
EXIT_USAGE, EXIT_UNAUTHORIZED, EXIT_KEY_MISMATCH = 2, 3, 5
OTHER_SERVER = crypto.public_hex(crypto.generate_private_key())  # a man in the middle's key


def enroll(home, code):
    return subprocess.run(command("diglett") + ["enroll", code], capture_output=True, text=True,
                          timeout=30, env=_env(home))


def _env(home):
    return dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1")


def invite(gw, name, *options):
    result = gw.admin("invite", name, *options)
    (code,) = result.stdout.split()
    assert code.startswith(invitecode.PREFIX) and "works once" in result.stderr
    return code


def config_dir(home):
    return home / ".config" / "diglett"


@pytest.fixture
def gw(tmp_path):
    gateway = Gateway(tmp_path / "gw").start()
    harness.wait_until(lambda: json.loads(gateway.admin("gateways", "--json").stdout), 10,
                       what="the gateway's row")
    return gateway


@pytest.mark.timeout(90)
def test_a_fresh_agent_enrols_with_one_code_then_runs_with_only_its_name(gw, tmp_path):
    code = invite(gw, "foo", "--ttl", "10m", "--basic-auth", "alice:" + APR1)
    home = tmp_path / "home"
    result = enroll(home, code)
    assert result.returncode == 0, result.stderr
    assert "enrolled foo.example.test" in result.stdout
    assert "diglett -n foo BACKEND" in result.stdout
    assert (config_dir(home) / "agent.key").exists()  # made because there was none
    assert gw.key in (config_dir(home) / "known_servers").read_text()  # pinned
    public = subprocess.run(command("diglett") + ["pubkey"], capture_output=True, text=True,
                            timeout=30, env=_env(home), check=True).stdout.strip()
    (grant,) = json.loads(gw.admin("grants", "--json").stdout)
    assert (grant["subdomain"], grant["key"]) == ("foo", public)  # bound to the new key
    assert grant["policy"]["basic_auth"] == ["alice:" + APR1]  # the invite's options
    (listed,) = json.loads(gw.admin("invites", "--json").stdout)
    assert listed["state"] == "used" and listed["used_by"] == public
    assert "secret" not in json.dumps(listed)

    backend = Backend(echo)
    try:
        agent = Agent(command("diglett") + ["-n", "foo", "%s:%d" % backend.address],
                      tmp_path, "agent-enrolled", env={"HOME": str(home)})
        port = agent.wait_up()
        sock = connect(port)
        sock.sendall(b"hello through an enrolled agent")
        assert recv_exact(sock, 31) == b"hello through an enrolled agent"
        sock.close()
        agent.stop()
    finally:
        backend.close()

    again = enroll(tmp_path / "other-home", code)  # the same code, another machine
    assert again.returncode == EXIT_UNAUTHORIZED, again.stderr
    assert "already used" in again.stderr
    assert not (config_dir(tmp_path / "other-home") / "known_servers").exists()
    assert len(json.loads(gw.admin("grants", "--json").stdout)) == 1
    audit = [e["action"] for e in json.loads(gw.admin("audit", "--json").stdout)]
    assert "invite-used" in audit and "invite-refused" in audit


@pytest.mark.timeout(60)
def test_an_expired_code_is_refused(gw, tmp_path):
    code = invite(gw, "bar", "--ttl", "1s")
    harness.wait_until(lambda: json.loads(gw.admin("invites", "--json").stdout)[0]["state"]
                       == "expired", 10, interval=0.2, what="the invite to expire")
    result = enroll(tmp_path / "home", code)
    assert result.returncode == EXIT_UNAUTHORIZED, result.stderr
    assert "expired" in result.stderr
    assert json.loads(gw.admin("grants", "--json").stdout) == []


@pytest.mark.timeout(90)
def test_damaged_and_forged_codes_are_refused(gw, tmp_path):
    code = invite(gw, "foo")
    real = invitecode.decode(code)
    flipped = code[:20] + ("A" if code[20] != "A" else "B") + code[21:]
    cases = [
        (flipped, EXIT_USAGE, "damaged"),
        ("dg2-" + code[4:], EXIT_USAGE, "starts with"),
        (invitecode.encode(dataclasses.replace(real, secret="00" * 16)), EXIT_UNAUTHORIZED,
         "secret is wrong"),
        (invitecode.encode(dataclasses.replace(real, invite_id="00" * 8)), EXIT_UNAUTHORIZED,
         "invite unknown"),
        (invitecode.encode(dataclasses.replace(real, subdomain="baz")), EXIT_UNAUTHORIZED,
         "is for 'foo', not 'baz'"),
        (invitecode.encode(dataclasses.replace(real, server_key=OTHER_SERVER)),
         EXIT_KEY_MISMATCH, "key"),
    ]
    for index, (forged, exit_code, reason) in enumerate(cases):
        home = tmp_path / ("home-%d" % index)
        result = enroll(home, forged)
        assert result.returncode == exit_code, (reason, result.returncode, result.stderr)
        assert reason in result.stderr, (reason, result.stderr)
        assert not (config_dir(home) / "known_servers").exists()
        assert not (config_dir(home) / "enrolled").exists()
    assert json.loads(gw.admin("grants", "--json").stdout) == []
    assert enroll(tmp_path / "home-real", code).returncode == 0  # the real one still works
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(60)
def test_a_wrong_code_counts_toward_admission_penalties(tmp_path):
    gw = Gateway(tmp_path / "gw", penalty_max="60").start()
    harness.wait_until(lambda: json.loads(gw.admin("gateways", "--json").stdout), 10,
                       what="the gateway's row")
    real = invitecode.decode(invite(gw, "foo"))
    forged = invitecode.encode(dataclasses.replace(real, secret="ff" * 16))
    assert penalties(gw) == 0
    result = enroll(tmp_path / "home", forged)
    assert result.returncode == EXIT_UNAUTHORIZED and "secret is wrong" in result.stderr
    assert penalties(gw) == 1
    assert json.loads(gw.admin("grants", "--json").stdout) == []


def penalties(gw):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % gw.http_address[1],
                                timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("diglett_penalties_total"))


@pytest.mark.timeout(90)
def test_a_code_naming_the_websocket_gateway_enrols_and_runs_over_it(tmp_path):
    gw = reach_gateway(tmp_path / "gw")
    url = "ws://127.0.0.1:%d/diglett" % gw.ws_port  # the only way in the code knows
    code = invite(gw, "foo", "--gateway", url)
    assert invitecode.decode(code).gateways == url
    home = tmp_path / "home"
    result = enroll(home, code)
    assert result.returncode == 0, result.stderr
    assert (config_dir(home) / "enrolled").read_text() == "foo %s\n" % url
    backend = Backend(echo)
    try:
        agent = Agent(command("diglett") + ["-n", "foo", "%s:%d" % backend.address],
                      tmp_path, "agent-ws", env={"HOME": str(home)})
        sock = connect(agent.wait_up())
        sock.sendall(b"over the websocket gateway")
        assert recv_exact(sock, 26) == b"over the websocket gateway"
        sock.close()
        agent.stop()
    finally:
        backend.close()


@pytest.mark.timeout(30)
def test_invite_refuses_a_gateway_the_agent_could_not_dial(gw):
    for bad, words in (("ftp://gw.test", "unknown scheme 'ftp'"), ("gw.test", "missing :PORT"),
                       ("a:1,b:2", "repeat --gateway")):
        result = gw.admin("invite", "foo", "--gateway", bad, check=False)
        assert result.returncode != 0 and words in result.stderr, result.stderr
    assert json.loads(gw.admin("invites", "--json").stdout) == []  # nothing was made
