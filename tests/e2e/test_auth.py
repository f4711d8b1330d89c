"""End to end, real processes on loopback: who gets a tunnel, and what never gets one.

Refusals and their exit codes (test plan B1, B4, B6), server authentication and pinning
(B3), handshake replay, a flipped bit and a tampered act two (A5), junk on the agent port
(A2), proof of possession of a granted key, names that try to inject into Traefik rules or
hook scripts (refused by diglett-admin, and by the server even when the registry holds them),
and the agent's lifecycle: killed, restarted, revoked (also mid-download, seen by the hooks),
replaced, stopped (B5). Every process is a real diglett-server, diglett, diglett-admin or
Traefik; the tests talk to them over 127.0.0.1 only.

Why ~640 lines: one subject, authentication and authorization end to end, each test alone.
"""

import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import threading
import time

import pytest

from diglett import crypto, noise, protocol, wire
from diglett.wire import ErrorCode
from tests.support import harness
from tests.support.harness import Agent, Backend, Gateway, Relay, command, connect, wait_until
from tests.support.hookfixtures import (
    HttpBackend,
    read_log,
    recorder,
    succeeded,
    traefik,  # noqa: F401 (a fixture)
)
from tests.support.peers import CLOSED_EOF, CLOSED_RESET, TestAgent

EXIT_OK, EXIT_USAGE, EXIT_UNAUTHORIZED, EXIT_INVALID_NAME = 0, 2, 3, 4
EXIT_SERVER_KEY_MISMATCH, EXIT_REVOKED, EXIT_REPLACED = 5, 6, 7
HANDSHAKE_TIMEOUT = float(harness.TEST_SERVER_OPTIONS["handshake_timeout"])
PREAMBLE_AND_ACT_ONE = wire.PREAMBLE_SIZE + noise.ACT_ONE_SIZE
VERSION_REJECT = b"digl" + bytes([0, 2]) + (1).to_bytes(2, "big")


# ----- helpers ---------------------------------------------------------------------------------
def start_agent(workdir, gateway, name, key_file, backend, *flags, label="agent"):
    """An agent with exactly these flags (no --server-key unless given), not waited for."""
    if not isinstance(backend, str):
        backend = "%s:%d" % backend
    argv = command("diglett") + ["-g", gateway, "-n", name, "--key-file", str(key_file),
                                 *flags, backend]
    return Agent(argv, workdir, "%s-%d" % (label, len(harness.Proc.registry)))


def exit_code(agent, timeout=10):
    try:
        return agent.wait(timeout)
    except Exception:
        raise AssertionError("%s still running after %s s:\n%s"
                             % (agent.label, timeout, agent.stderr()[-3000:])) from None


def echo_round_trip(port, payload=b"ping through the tunnel"):
    with connect(port, timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert harness.recv_all(sock) == digest(payload)


def digest(data):
    """What harness.recv_all returns for ``data``: (sha256 hex, length)."""
    return hashlib.sha256(data).hexdigest(), len(data)


def recv_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError("closed after %d of %d bytes" % (len(data), size))
        data += chunk
    return bytes(data)


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def read_until_closed(sock, timeout=10):
    """Everything the peer sends before it closes: (bytes, True if it ended with a reset)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data), False
            data += chunk
    except ConnectionResetError:
        return bytes(data), True


def make_key(path):
    """A key file made by `diglett keygen`: (path, public key hex)."""
    result = harness.subprocess.run(command("diglett") + ["keygen", "--key-file", str(path)],
                                    check=True, capture_output=True, text=True, timeout=30)
    return path, result.stdout.strip()


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_server_traceback(request):
    """Peer faults are logged in one line each; a traceback in the server log is our bug."""
    yield
    gateway = request.node.funcargs.get("gateway")
    if gateway is not None and gateway.proc is not None:
        assert "Traceback" not in gateway.proc.stderr(), gateway.proc.stderr()[-4000:]


def open_fds(proc):
    return len(os.listdir("/proc/%d/fd" % proc.pid))


@pytest.fixture
def granted(gateway):
    """A key file granted ``foo``: (path, public key)."""
    path, public = gateway.new_key("foo")
    gateway.grant("foo", public)
    return path, public


# ----- refusals ----------------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_ungranted_key_is_refused_unauthorized_even_for_a_connected_name(gateway, echo_backend,
                                                                         granted):
    owner = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    stranger, _ = gateway.new_key("stranger")
    for name in ("foo", "nobody"):  # connected or not, the answer is the same: no oracle
        intruder = gateway.agent(name, echo_backend.address, key_file=stranger, wait=False)
        assert exit_code(intruder) == EXIT_UNAUTHORIZED
        assert "UNAUTHORIZED" in intruder.stderr()
        assert "NAME_IN_USE" not in intruder.stderr()
        assert "tunnel up" not in intruder.stdout()
    assert [s["port"] for s in gateway.sessions()] == [owner.port]
    echo_round_trip(owner.port)


@pytest.mark.timeout(40)
def test_key_granted_another_name_is_refused(gateway, echo_backend, granted):
    _, other = gateway.new_key("bar-owner")
    gateway.grant("bar", other)
    agent = gateway.agent("bar", echo_backend.address, key_file=granted[0], wait=False)
    assert exit_code(agent) == EXIT_UNAUTHORIZED
    assert "UNAUTHORIZED" in agent.stderr()
    assert gateway.sessions() == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["Foo_bar", "-x", "foo.bar", "a" * 64])
def test_invalid_name_exits_4_before_connecting(tmp_path, name):
    listener = socket.create_server(("127.0.0.1", 0))  # a gateway that only counts dials
    listener.settimeout(0)
    key, public = make_key(tmp_path / "agent.key")
    agent = start_agent(tmp_path, "127.0.0.1:%d" % listener.getsockname()[1], "", key,
                        "127.0.0.1:80", "--name=" + name, "--server-key", public)
    assert exit_code(agent) == EXIT_INVALID_NAME
    assert "name" in agent.stderr().lower()
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody dialled
    listener.close()


@pytest.mark.timeout(40)
def test_name_in_use_by_another_key_is_retried_until_free(gateway, echo_backend, granted):
    first = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    second_key, second_public = gateway.new_key("second")
    gateway.grant("foo", second_public)
    second = gateway.agent("foo", echo_backend.address, key_file=second_key, wait=False)
    second.wait_for("NAME_IN_USE", timeout=10)
    time.sleep(0.5)
    assert second.popen.poll() is None, "a name in use is transient: the agent must retry"
    assert "tunnel up" not in second.stdout()
    echo_round_trip(first.port)
    assert first.stop() == EXIT_OK
    second.wait_up(timeout=15)  # its next retry gets the name
    echo_round_trip(second.port)
    assert [s["key"] for s in gateway.sessions()] == [second_public]


# ----- server authentication ---------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_wrong_server_key_exits_5_naming_the_pinned_key(gateway, echo_backend, granted):
    _, wrong = gateway.new_key("not-the-server")
    agent = gateway.agent("foo", echo_backend.address, key_file=granted[0], server_key=wrong,
                          wait=False)
    assert exit_code(agent) == EXIT_SERVER_KEY_MISMATCH
    assert wrong in agent.stderr()
    assert "mismatch" in agent.stderr()
    assert gateway.sessions() == []


@pytest.mark.timeout(40)
def test_man_in_the_middle_never_gets_the_agents_key_or_config(gateway, tmp_path, echo_backend,
                                                               granted):
    impostor = Gateway(tmp_path / "impostor").start()  # its own key; it would grant anything
    impostor.grant("foo", granted[1])
    relay = Relay(impostor.agent_address)
    try:
        agent = start_agent(gateway.workdir, relay.gateway, "foo", granted[0],
                            echo_backend.address, "--server-key", gateway.key)
        assert exit_code(agent) == EXIT_SERVER_KEY_MISMATCH
        assert gateway.key in agent.stderr()
        assert "tunnel up" not in agent.stdout()
        # The agent stopped after act one: no act three (its static key), no CONFIG.
        assert len(relay.upstream) == PREAMBLE_AND_ACT_ONE
        assert impostor.sessions() == [] and gateway.sessions() == []
    finally:
        relay.close()


@pytest.mark.timeout(60)
def test_info_url_pins_on_first_use_and_a_changed_key_is_refused(gateway, echo_backend, granted):
    info_url = "http://%s:%d/info" % gateway.http_address
    known = gateway.workdir / "known_servers"  # the default: next to the key file
    agent = start_agent(gateway.workdir, gateway.gateway, "foo", granted[0],
                        echo_backend.address, "--info-url", info_url)
    agent.wait_up()
    assert known.read_text().split("\n")[0] == "%s %s" % (gateway.gateway, gateway.key)
    echo_round_trip(agent.port)
    assert agent.stop() == EXIT_OK

    old_key = gateway.key
    (gateway.workdir / "server.key").unlink()
    gateway.restart()
    assert gateway.key != old_key
    again = start_agent(gateway.workdir, gateway.gateway, "foo", granted[0],
                        echo_backend.address, "--info-url", info_url)
    assert exit_code(again) == EXIT_SERVER_KEY_MISMATCH
    message = again.stderr()
    assert old_key in message and gateway.key in message
    assert "%s:1" % known in message  # the line to edit, like ssh's "Offending key"
    assert "tunnel up" not in again.stdout()


@pytest.mark.timeout(20)
def test_no_server_key_at_all_exits_2_saying_how_to_get_it(tmp_path):
    key, public = make_key(tmp_path / "agent.key")
    agent = start_agent(tmp_path, "127.0.0.1:%d" % free_port(), "foo", key, "127.0.0.1:80")
    assert exit_code(agent) == EXIT_USAGE
    message = agent.stderr()
    assert "--server-key" in message and "--info-url" in message
    assert not (tmp_path / "known_servers").exists()


# ----- tampering ---------------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_replayed_handshake_gets_nothing(gateway, echo_backend, granted):
    relay = Relay(gateway.agent_address, record=300)
    agent = start_agent(gateway.workdir, relay.gateway, "foo", granted[0], echo_backend.address,
                        "--server-key", gateway.key)
    port = agent.wait_up()
    assert agent.stop() == EXIT_OK
    relay.close()
    wait_until(lambda: gateway.sessions() == [], 5, what="the session to end")
    transcript = bytes(relay.upstream)
    assert len(transcript) > PREAMBLE_AND_ACT_ONE + noise.ACT_THREE_SIZE  # CONFIG included

    with socket.create_connection(gateway.agent_address, timeout=5) as sock:
        sock.sendall(transcript[:PREAMBLE_AND_ACT_ONE])
        act_two = recv_exactly(sock, noise.ACT_TWO_SIZE)
        assert act_two != bytes(relay.downstream[:noise.ACT_TWO_SIZE])  # a fresh ephemeral key
        sock.sendall(transcript[PREAMBLE_AND_ACT_ONE:])
        data, _ = read_until_closed(sock, timeout=HANDSHAKE_TIMEOUT + 2)
    assert data == b"", "the server answered a replayed act three: %r" % data
    time.sleep(0.5)
    assert gateway.sessions() == []
    stats = gateway.http_get("/debug/stats")
    assert stats["agents"] == 0
    assert any("act3" in why for why in stats["handshake_failures"]), stats
    assert refused(port)


def blob_backend(size, seed):
    def handler(sock):
        harness.send_pattern(sock, size, seed)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the client to go
    return Backend(handler)


@pytest.mark.timeout(60)
def test_flipped_bit_closes_the_connection_and_the_client_sees_a_reset(gateway, granted):
    size = 1 << 20
    backend = blob_backend(size, b"blob")
    relay = Relay(gateway.agent_address, flip_at=64 * 1024 + 77)
    try:
        agent = start_agent(gateway.workdir, relay.gateway, "foo", granted[0], backend.address,
                            "--server-key", gateway.key)
        port = agent.wait_up()
        expected = harness.pattern(size, b"blob")
        with connect(port) as client:
            data, reset = read_until_closed(client)
        assert relay.flipped.is_set()
        assert reset, "a tampered record must reset the client, not end it cleanly"
        assert len(data) < size and expected.startswith(data), "corrupted data reached the client"

        agent.wait_up(count=2)  # the agent reconnects (through the relay, untouched now)
        assert agent.popen.poll() is None
        with connect(agent.port) as client:
            assert harness.recv_all(client) == digest(expected)
    finally:
        relay.close()
        backend.close()


# ----- junk on the agent port --------------------------------------------------------------------
def junk_answer(address, junk):
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        return read_until_closed(sock, timeout=HANDSHAKE_TIMEOUT + 2)[0]


@pytest.mark.timeout(60)
def test_junk_on_the_agent_port_never_affects_a_connected_agent(gateway, echo_backend, granted):
    agent = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    echo_round_trip(agent.port)
    baseline = open_fds(gateway.proc)
    silent = {}

    def then_silence(prefix):
        with socket.create_connection(gateway.agent_address, timeout=10) as sock:
            sock.sendall(prefix)
            started = time.monotonic()
            answer = read_until_closed(sock, timeout=HANDSHAKE_TIMEOUT * 3)
            silent[prefix] = answer[0], time.monotonic() - started

    stalls = [threading.Thread(target=then_silence, args=(prefix,))
              for prefix in (b"digl\x02\x02\x00", wire.encode_preamble())]  # 7 bytes, 8 bytes
    for stall in stalls:
        stall.start()
    garbage = random.Random(7).randbytes(64 * 1024)
    assert garbage[:4] != wire.MAGIC
    cases = [
        (b"XXXX\x02\x02\x00\x00", b""),  # wrong magic: nothing back
        (b"digl\x01\x01\x00\x00", VERSION_REJECT),  # the Rust prototype's version
        (b"digl\x7f\x7f\x00\x00", VERSION_REJECT),
        (b"digl\x02\x01\x00\x00", b""),  # max_version below version
        (b"digl\x02\x02\x00\x01", b""),  # reserved flags
        (b"GET / HTTP/1.1\r\nHost: foo.example.test\r\n\r\n", b""),
        (b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(189), b""),  # TLS hello
        (garbage, b""),
    ]
    for junk, answer in cases:
        assert junk_answer(gateway.agent_address, junk) == answer, junk[:16]
        echo_round_trip(agent.port)
        assert gateway.http_get("/healthz")["status"] == "ok"
    for stall in stalls:
        stall.join(HANDSHAKE_TIMEOUT * 4)
    assert len(silent) == 2, silent
    for answer, after in silent.values():  # closed at handshake_timeout, nothing said
        assert answer == b"" and HANDSHAKE_TIMEOUT * 0.8 <= after <= HANDSHAKE_TIMEOUT * 1.5, silent
    echo_round_trip(agent.port)
    assert agent.popen.poll() is None
    assert len(harness.TUNNEL_UP.findall(agent.stdout())) == 1, "the agent had to reconnect"
    assert gateway.http_get("/debug/stats")["agents"] == 1
    wait_until(lambda: open_fds(gateway.proc) <= baseline, 3,
               what="the server's open files to return to %d" % baseline)


# ----- lifecycle ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_killed_agent_closes_its_port_and_a_restart_gets_it_back(gateway, echo_backend, granted):
    agent = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    port = agent.port
    echo_round_trip(port)
    client = connect(port)  # an open stream: it must end with the agent
    client.sendall(b"hello")
    assert client.recv(5) == b"hello"
    agent.signal(signal.SIGKILL)
    wait_until(lambda: refused(port), 5, what="the tunnel port to close")
    assert read_until_closed(client, timeout=5) == (b"", True), "its streams are reset"
    client.close()
    wait_until(lambda: gateway.sessions() == [], 5, what="the session to end")
    again = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    assert again.port == port, "a reconnecting agent gets its last port back"
    echo_round_trip(port)


@pytest.mark.timeout(40)
def test_grant_with_port_pins_the_tunnel_port(gateway, echo_backend):
    key, public = gateway.new_key("pinned")
    pinned = free_port()
    gateway.grant("pinned", public, "--port", str(pinned))
    agent = gateway.agent("pinned", echo_backend.address, key_file=key)
    assert agent.port == pinned
    assert "pinned.example.test" in agent.stdout()
    echo_round_trip(pinned)


@pytest.mark.timeout(40)
def test_revoking_a_connected_agent_disconnects_it_and_it_exits_6(gateway, echo_backend,
                                                                  granted):
    agent = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    _, other = gateway.new_key("other")
    gateway.grant("foo", other)
    gateway.admin("revoke", "foo", "--key", other)  # someone else's grant: no effect on this one
    time.sleep(2.5)  # longer than the server's grant poll
    assert agent.popen.poll() is None
    echo_round_trip(agent.port)
    client = connect(agent.port)  # an open stream, cut by the revocation
    client.sendall(b"before")
    assert client.recv(6) == b"before"
    started = time.monotonic()
    gateway.admin("revoke", "foo")
    assert exit_code(agent, timeout=5 + 1) == EXIT_REVOKED
    assert time.monotonic() - started < 5
    assert "REVOKED" in agent.stderr()
    assert read_until_closed(client, timeout=5) == (b"", True), "its streams are reset"
    client.close()
    assert refused(agent.port)
    wait_until(lambda: gateway.sessions() == [], 5, what="the session to end")


@pytest.mark.timeout(40)
def test_same_key_again_takes_the_name_over_and_the_old_agent_exits_7(gateway, echo_backend,
                                                                      granted):
    old = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    new = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    assert exit_code(old, timeout=5) == EXIT_REPLACED
    assert "REPLACED" in old.stderr()
    assert new.popen.poll() is None
    sessions = gateway.sessions()
    assert len(sessions) == 1 and sessions[0]["port"] == new.port
    echo_round_trip(new.port)


@pytest.mark.timeout(20)
def test_sigterm_while_retrying_exits_0_at_once(tmp_path):
    key, public = make_key(tmp_path / "agent.key")
    agent = start_agent(tmp_path, "127.0.0.1:%d" % free_port(), "foo", key, "127.0.0.1:80",
                        "--server-key", public)
    agent.wait_for("reconnecting in", timeout=10)  # nobody listens: transient, retried
    started = time.monotonic()
    assert agent.stop(timeout=5) == EXIT_OK
    assert time.monotonic() - started < 2


@pytest.mark.timeout(20)
def test_sigterm_during_a_stalled_handshake_exits_0_at_once(tmp_path):
    key, public = make_key(tmp_path / "agent.key")
    with socket.create_server(("127.0.0.1", 0)) as mute:  # the kernel accepts; nobody answers
        agent = start_agent(tmp_path, "127.0.0.1:%d" % mute.getsockname()[1], "foo", key,
                            "127.0.0.1:80", "--server-key", public)
        time.sleep(1)  # connected, act one sent, waiting for act two
        assert agent.popen.poll() is None
        started = time.monotonic()
        assert agent.stop(timeout=8) == EXIT_OK
        assert time.monotonic() - started < 2, "SIGTERM waited for the handshake timeout"


@pytest.mark.timeout(30)
def test_sigterm_stops_the_agent_cleanly_and_ends_the_session(gateway, echo_backend, granted):
    agent = gateway.agent("foo", echo_backend.address, key_file=granted[0])
    assert [s["subdomain"] for s in gateway.sessions()] == ["foo"]
    assert agent.stop(timeout=5) == EXIT_OK
    wait_until(lambda: gateway.sessions() == [], 5, what="the session to end")
    assert refused(agent.port)



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
