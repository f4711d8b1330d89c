"""Test plan B (authorization), the parts the older tests leave open, end to end on loopback.

Names that try to inject into Traefik rules or hook scripts (refused by diglett-admin, and by
the server even when the registry holds them), proof of possession of a granted key, a tampered
act two, and a revocation seen by the hooks. Real diglett-server, agents, Traefik and scripts.
"""

import json
import socket
import sqlite3
import time

import pytest

from diglett import crypto, protocol
from diglett.wire import ErrorCode
from tests import harness
from tests.harness import Gateway, Relay, connect, wait_until
from tests.hookfixtures import HttpBackend, read_log, recorder, succeeded
from tests.hookfixtures import traefik  # noqa: F401 (a fixture)
from tests.plan_peer import CLOSED_EOF, CLOSED_RESET, TestAgent

EXIT_INVALID_NAME, EXIT_SERVER_KEY_MISMATCH, EXIT_REVOKED = 4, 5, 6

INJECTIONS = [
    "", "-foo", "foo-", "a" * 64, "foo.bar", "foo_bar", "f\u043e\u043e", "foo\n", "foo\x00",
    "foo bar", "x`) || PathPrefix(`/`)", "$(touch {canary})", ";id", "../../etc/passwd",
    "%2e%2e", "a" * 4096, "victim.example.test",
]


def hook_sections(tf, script):
    return {"hooks": {"enabled": "traefik, script", "retry_max": "1"},
            "hook:traefik": {"api": tf.api, "entrypoints": "web", "check_interval": "1",
                             "settle": "3"},
            "hook:script": {"command": str(script), "timeout": "5"}}


@pytest.mark.timeout(120)
def test_injection_names_are_refused_by_admin_and_by_the_server_and_never_reach_hooks(
        tmp_path, traefik):
    canary = tmp_path / "dg-canary"
    names = [name.replace("{canary}", str(canary)) for name in INJECTIONS]
    script, log = recorder(tmp_path)
    gw = Gateway(tmp_path / "gw", sections=hook_sections(traefik, script)).start()
    key_file, public = gw.new_key("attacker")

    # diglett-admin refuses every one, with one line naming the rule
    for name in names:
        if "\x00" in name:
            continue  # cannot be an argv entry at all
        result = gw.admin("grant", "--key", public, "--", name, check=False)
        assert result.returncode != 0, name
        assert "invalid subdomain" in result.stderr and "a-z, 0-9" in result.stderr, (
            name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert json.loads(gw.admin("grants", "--json").stdout) == []

    # Someone writes them into the registry by hand: the server still refuses at CONFIG.
    with sqlite3.connect(gw.workdir / "registry.db", timeout=10) as db:
        db.executemany("INSERT INTO grants (subdomain, key, port, comment, created)"
                       " VALUES (?, ?, NULL, '', 0)", [(name[:4000], public) for name in names])
    time.sleep(1.5)  # a grant poll
    private = crypto.read_private_key(key_file)
    for name in names:
        name = name[:4000]  # a CONFIG holds at most 4096 bytes of JSON
        peer = TestAgent(gw.agent_address, gw.key, private)
        assert peer.start() is None
        answer = peer.login(name)
        assert isinstance(answer, protocol.Refused), (name, answer)
        assert answer.code == ErrorCode.INVALID_NAME, (name, answer)
        assert peer.until_closed(5)[0] in (CLOSED_EOF, CLOSED_RESET)
        peer.close()
    assert gw.sessions() == []

    # A legitimate name (written in upper case) is stored, routed and scripted in canonical form.
    good_key, good_public = gw.new_key("good")
    gw.grant("Foo", good_public)
    backend = HttpBackend("foo")
    try:
        agent = gw.agent("foo", backend.address, key_file=good_key)
        wait_until(lambda: succeeded(log), 10, what="the script's connect")
        wait_until(lambda: any(r["name"].endswith("@rest") for r in traefik.routers()), 10,
                   what="foo's router")
        assert traefik.get("foo.example.test")[0] == 200
    finally:
        backend.close()
    rules = [r["rule"] for r in traefik.routers() if r["name"].endswith("@rest")]
    assert rules == ["Host(`foo.example.test`)"], rules
    assert traefik.status("victim.example.test") == 404
    runs = read_log(log)
    assert [r["env"]["DIGLETT_SUBDOMAIN"] for r in runs] == ["foo"], runs
    assert runs[0]["env"]["DIGLETT_HOST"] == "foo.example.test"
    assert not canary.exists(), "a name reached a shell"
    assert agent.popen.poll() is None
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(40)
def test_claiming_a_granted_key_without_holding_it_fails_at_act_three(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    owner = gw.agent("foo", echo_backend.address)  # K1, granted foo, connected
    k1_public = gw.sessions()[0]["key"]
    attacker = crypto.generate_private_key()
    peer = TestAgent(gw.agent_address, gw.key, attacker, claimed_pub=bytes.fromhex(k1_public))
    assert peer.start() is None  # acts one and two are fine: anyone may start a handshake
    peer.session.send_config({"subdomain": "foo", "agent": "x", "features": []})
    peer.flush()
    how, _ = peer.until_closed(5)
    assert how in (CLOSED_EOF, CLOSED_RESET) and peer.events == []
    peer.close()
    stats = gw.http_get("/debug/stats")
    assert stats["handshake_failures"].get("act3 bad tag") == 1, stats
    log = gw.proc.stderr()
    assert "act3 bad tag" in log
    assert crypto.fingerprint(k1_public) not in log.split("act3 bad tag")[0].splitlines()[-1]
    assert "refused" not in log, "the server looked the key up before the proof of possession"
    assert [s["port"] for s in gw.sessions()] == [owner.port]
    with connect(owner.port, timeout=5) as sock:
        harness.round_trips(sock, 3)


@pytest.mark.timeout(30)
def test_tampered_act_two_stops_the_agent_before_it_reveals_its_key(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    key_file, public = gw.new_key("foo")
    gw.grant("foo", public)
    # the last byte of act two's tag, on its way to the agent
    relay = Relay(gw.agent_address, flip_at=49, flip_downstream=True)
    try:
        argv = harness.command("diglett") + ["-g", relay.gateway, "-n", "foo", "--key-file",
                                             str(key_file), "--server-key", gw.key,
                                             "%s:%d" % echo_backend.address]
        agent = harness.Agent(argv, gw.workdir, "agent")
        assert agent.wait(10) == EXIT_SERVER_KEY_MISMATCH
        assert relay.flipped.is_set()
        assert gw.key in agent.stderr() and "mismatch" in agent.stderr()
        assert len(relay.upstream) == 8 + 50, "the agent sent more than preamble and act one"
        assert gw.sessions() == []
    finally:
        relay.close()


@pytest.mark.timeout(60)
def test_revoke_during_a_download_ends_the_session_for_hooks_and_spares_others(tmp_path,
                                                                               echo_backend):
    script, log = recorder(tmp_path)
    gw = Gateway(tmp_path / "gw", sections={
        "hooks": {"enabled": "script", "retry_max": "1"},
        "hook:script": {"command": str(script), "timeout": "5"}}).start()
    backend = harness.Backend(harness.flood({}))
    try:
        foo = gw.agent("foo", backend.address)
        bar = gw.agent("bar", echo_backend.address)
        wait_until(lambda: len(succeeded(log)) == 2, 10, what="both connects")
        download = connect(foo.port)
        harness.recv_exact(download, 1 << 20)  # mid-download
        probe = connect(bar.port)
        harness.round_trips(probe, 5)
        revoked = time.monotonic()
        gw.admin("revoke", "foo")
        assert foo.wait(6) == EXIT_REVOKED
        took = time.monotonic() - revoked
        with pytest.raises(OSError):  # reset, never a clean end of the download
            while download.recv(262144):
                pass
            raise AssertionError("the download ended cleanly")
        download.close()
        ended = wait_until(lambda: [e for e in succeeded(log) if e["DIGLETT_EVENT"] ==
                                    "disconnect"], 10, what="the script's disconnect")
        assert [(e["DIGLETT_SUBDOMAIN"], e["DIGLETT_REASON"]) for e in ended] == \
            [("foo", "revoked")]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", foo.port), timeout=2)
        harness.round_trips(probe, 20)  # bar never noticed
        probe.close()
        print("foo revoked: agent exited %.2f s after diglett-admin revoke" % took)
        again = gw.agent("foo", backend.address, key_file=gw.workdir / "foo.key", wait=False)
        assert again.wait(10) == 3  # no grant any more: exit UNAUTHORIZED, no retry loop
        assert bar.popen.poll() is None
    finally:
        backend.close()
