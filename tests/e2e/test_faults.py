"""End-to-end faults with real processes on loopback: a locked registry, one on a tmpfs that
turns read-only or fills up (the tunnels stay up, the server says what is wrong once and
catches up when the disk is back; mounting needs root, else those tests skip and say so),
kill -9 and SIGTERM of the server, a silently dead network path (also under a download
through Traefik, which must fail visibly), stream limits, hostile handshakes, and backends
that hang or come up late (test plan D, E3).

Each test runs a real diglett-server (tests.support.harness.Gateway, shrunk timers) and real
agents; clients, backends and the fault relay live in the test process. Every test has a
deadline and every loop is bounded in count and time.

Why ~830 lines: one subject, faults end to end (registry, process, network, backend), each test
alone.
"""

import datetime
import http.server
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support import harness
from tests.support.fault_relay import FaultRelay
from tests.support.harness import Backend, Gateway, connect, echo, port_closed, wait_until
from tests.support.hookfixtures import (
    serve_http,
    traefik,  # noqa: F401 (a fixture)
)
from tests.support.probes import (
    KiB,
    MiB,
    agent_via,
)

DEAD_AFTER = float(harness.TEST_SERVER_OPTIONS["dead_after"])
HANDSHAKE_TIMEOUT = float(harness.TEST_SERVER_OPTIONS["handshake_timeout"])
SHUTDOWN_TIMEOUT = float(harness.TEST_SERVER_OPTIONS["shutdown_timeout"])
BUSY_REJECT = b"digl" + bytes([0, 2]) + (3).to_bytes(2, "big")  # wire.encode_reject(BUSY)
JUNK = b"GET / HTTP/1.1\r\n\r\n"  # wrong magic: the server's first read fails at once
AGENT_BACKOFF_BASE = 1.0  # seconds, diglett.agent.BACKOFF_BASE (the documented policy)
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$", re.M)
RECONNECT = re.compile(r"reconnecting in ([\d.]+) s")

# A process that holds an exclusive lock on the registry: prints "locked", sleeps, releases.
LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT INTO audit_log (time, actor, action, subdomain, key, detail)"
           " VALUES (0, 'test', 'lock', 'x', NULL, '')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
print("released", flush=True)
"""


# ----- helpers ------------------------------------------------------------------------------
def start_agent(gw, name, backend, gateway, label):
    """An agent dialling ``gateway`` (e.g. a relay) instead of the server itself."""
    key_file, public = gw.new_key(label)
    gw.grant(name, public)
    argv = harness.command("diglett") + [
        "-g", gateway, "-n", name, "--key-file", str(key_file), "--server-key", gw.key,
        "%s:%d" % backend]
    agent = harness.Agent(argv, gw.workdir, label)
    gw.agents.append(agent)
    agent.wait_up()
    return agent


def round_trip(sock, payload):
    """Send ``payload`` and read exactly as many bytes back; returns the seconds it took."""
    started = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(len(payload) - len(got))
        if not data:
            raise AssertionError("echo ended after %d of %d bytes" % (len(got), len(payload)))
        got += data
    assert got == payload
    return time.monotonic() - started


def echo_once(port, payload=b"ping"):
    with connect(port, timeout=5) as sock:
        round_trip(sock, payload)


def probe_latency(port, seconds):
    """Echo round trips back to back for ``seconds``; returns every round trip's duration."""
    samples = []
    with connect(port, timeout=10) as sock:
        deadline = time.monotonic() + seconds
        number = 0
        while time.monotonic() < deadline:
            samples.append(round_trip(sock, b"%08d" % number))
            number += 1
            time.sleep(0.005)
    return samples


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def log_records(text):
    """(UNIX time, level, logger, message) of every log line."""
    records = []
    for stamp, level, logger, message in LOG_LINE.findall(text):
        moment = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        records.append((moment, level, logger, message))
    return records


def reconnects(agent):
    """(UNIX time, announced delay) of every "reconnecting in" line of ``agent``."""
    found = []
    for moment, _, _, message in log_records(agent.stderr()):
        match = RECONNECT.search(message)
        if match:
            found.append((moment, float(match.group(1))))
    return found


def raw_connection(source, port, timeout=5):
    """A bare TCP connection to the agent port from source address ``source``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))
    return sock


def first_bytes(sock, wait):
    """What the server sends within ``wait`` seconds: bytes until EOF, or None if silent."""
    sock.settimeout(wait)
    got = b""
    try:
        while True:
            data = sock.recv(64)
            if not data:
                return got
            got += data
    except socket.timeout:
        return got or None
    except ConnectionResetError:
        return got


def flood(sock):
    """Backend that streams seeded bytes until the client goes away (at most 256 MiB)."""
    block = harness.pattern(1 << 20, b"flood")
    for _ in range(256):
        sock.sendall(block)


def session_reasons(db_path, ids):
    with sqlite3.connect(db_path, timeout=5) as db:
        rows = db.execute("SELECT id, state, reason FROM sessions").fetchall()
    return {row[0]: (row[1], row[2]) for row in rows if row[0] in ids}


# ----- the registry ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_locked_registry_does_not_stall_tunnels_or_logins(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    agent = gw.agent("foo", echo_backend.address)
    baseline = probe_latency(agent.port, 0.5)
    bar_key, bar_public = gw.new_key("bar")
    gw.grant("bar", bar_public)

    holder = harness.Proc([sys.executable, "-c", LOCK_HOLDER, str(gw.workdir / "registry.db"),
                           "4"], gw.workdir, "lock-holder")
    holder.wait_for("locked", timeout=10, stream="stdout")
    locked_at = time.monotonic()
    result = {}
    prober = threading.Thread(target=lambda: result.update(samples=probe_latency(agent.port, 3.5)))
    prober.start()
    bar = gw.agent("bar", echo_backend.address, key_file=bar_key, wait=False)
    bar.wait_up(timeout=20)
    bar_up_after = time.monotonic() - locked_at
    prober.join(10)
    holder.wait_for("released", timeout=10, stream="stdout")

    samples = result["samples"]
    assert len(samples) > 100, "too few round trips during the lock: %d" % len(samples)
    p99 = percentile(samples, 0.99)
    assert p99 < 0.1, "echo p99 %.3f s while the registry was locked (baseline p99 %.3f s)" % (
        p99, percentile(baseline, 0.99))
    assert max(samples) < 0.5, "a round trip froze for %.3f s" % max(samples)
    echo_once(bar.port)  # bar got in (during the lock, or after being told to retry)

    rows = wait_until(lambda: [r for r in gw.sessions() if r["subdomain"] == "bar"], 20,
                      interval=0.3, what="bar's session row after the lock")
    assert rows[0]["port"] == bar.port
    log = gw.proc.stderr()
    assert "Traceback" not in log
    noisy = [message for _, level, _, message in log_records(log)
             if level in ("WARNING", "ERROR", "CRITICAL")]
    assert 1 <= len(noisy) <= 3, "registry trouble should take one or two lines:\n" + "\n".join(
        noisy)
    assert re.search(r"registry|locked", noisy[0], re.I), noisy
    print("bar up %.1f s after the lock; p99 %.1f ms over %d round trips"
          % (bar_up_after, p99 * 1000, len(samples)))


# ----- the server dies or stops -------------------------------------------------------------
@pytest.mark.timeout(90)
def test_kill9_resets_clients_ends_stale_sessions_and_agents_return(tmp_path):
    backend = Backend(flood)
    try:
        gw = Gateway(tmp_path / "gw").start()
        agent = gw.agent("foo", backend.address)
        old_port = agent.port
        old_ids = {row["id"] for row in wait_until(gw.sessions, 10, interval=0.2,
                                                    what="foo's session row")}
        client = connect(old_port)
        assert harness.recv_all(client, limit=1 << 20)[1] >= 1 << 20  # mid-download

        gw.proc.kill()
        with pytest.raises(OSError):  # a reset or an error, never a clean end of file
            got = harness.recv_all(client, limit=256 << 20)
            raise AssertionError("the download ended cleanly after %d bytes" % got[1])
        client.close()

        gw.restart()
        log = gw.proc.stderr()
        for session_id in old_ids:
            assert re.search(r"session=%s ended reason=stale" % session_id, log), log
        assert not old_ids & {row["id"] for row in gw.sessions()}
        assert session_reasons(gw.workdir / "registry.db", old_ids) == {
            i: ("ended", "stale") for i in old_ids}

        new_port = agent.wait_up(timeout=20, count=2)  # by itself, with backoff
        assert agent.popen.poll() is None
        assert new_port == old_port, "the name's last port was free but not given back"
        rows = wait_until(lambda: [r for r in gw.sessions() if r["subdomain"] == "foo"], 10,
                          interval=0.2, what="foo's new session row")
        assert len(rows) == 1 and rows[0]["id"] not in old_ids and rows[0]["port"] == new_port
        with connect(new_port) as sock:
            assert harness.recv_all(sock, limit=65536)[1] >= 65536
    finally:
        backend.close()


@pytest.mark.timeout(90)
def test_sigterm_exits_0_in_time_and_agents_wait_for_the_server(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    agents = [gw.agent(name, echo_backend.address) for name in ("foo", "bar")]
    ids = {row["id"] for row in wait_until(lambda: len(gw.sessions()) == 2 and gw.sessions(), 10,
                                           interval=0.2, what="two session rows")}
    client = connect(agents[0].port)
    round_trip(client, b"before")

    started = time.monotonic()
    gw.proc.signal(harness.signal.SIGTERM)
    code = gw.proc.wait(SHUTDOWN_TIMEOUT + 5)
    took = time.monotonic() - started
    assert code == 0, gw.proc.stderr()[-3000:]
    assert took <= SHUTDOWN_TIMEOUT + 2, "shutdown took %.1f s" % took
    client.close()

    for agent in agents:
        agent.wait_for(r"SHUTTING_DOWN\); reconnecting now", timeout=5)
    time.sleep(1.5)  # long enough for a retry against the stopped server
    for agent in agents:
        assert agent.popen.poll() is None, "agent exited: %s" % agent.stderr()[-2000:]
    assert gw.sessions() == []
    assert session_reasons(gw.workdir / "registry.db", ids) == {
        i: ("ended", "shutdown") for i in ids}

    gw.restart()
    for agent in agents:
        echo_once(agent.wait_up(timeout=20, count=2))
    assert "reason=stale" not in gw.proc.stderr()
    assert len(gw.sessions()) == 2


# ----- a silently dead network path -----------------------------------------------------------
@pytest.mark.timeout(90)
def test_blackholed_agent_is_declared_dead_and_reconnects_with_backoff(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    relay = FaultRelay(gw.agent_address)
    try:
        agent = start_agent(gw, "foo", echo_backend.address, relay.gateway, "agent-foo")
        old_port = agent.port
        echo_once(old_port)
        time.sleep(1.5)  # pings flowing both ways

        relay.blackhole()
        dark_at, dark_wall = time.monotonic(), time.time()
        wait_until(lambda: port_closed(old_port), DEAD_AFTER + 3, interval=0.05,
                   what="the tunnel port to close")
        closed_after = time.monotonic() - dark_at
        assert closed_after <= DEAD_AFTER + 1.5, "server saw the dead agent after %.1f s" % (
            closed_after)
        print("tunnel port closed %.2f s after the path went dark" % closed_after)
        wait_until(lambda: gw.sessions() == [], 5, interval=0.2, what="the session to end")
        assert "reason=dead" in gw.proc.stderr()

        # Dark long enough for a few failed redials: delays ~[0.5,1], [1,2], [2,4], [4,8] s.
        wait_until(lambda: len(reconnects(agent)) >= 4, 20, interval=0.1,
                   what="four reconnect attempts")
        attempts = reconnects(agent)
        detected_after = attempts[0][0] - dark_wall
        assert detected_after <= DEAD_AFTER + 2, "agent saw the dead path after %.1f s" % (
            detected_after)
        assert "peer silent" in agent.stderr()
        print("agent redialled %.2f s after the path went dark" % detected_after)
        relay.passthrough()
        new_port = agent.wait_up(timeout=20, count=2)
        attempts = reconnects(agent)
        print("reconnect attempts (s after dark, delay): %s" % [
            ("%.2f" % (t - dark_wall), d) for t, d in attempts])

        delays = [delay for _, delay in attempts]
        for number, delay in enumerate(delays):
            ceiling = AGENT_BACKOFF_BASE * 2 ** number
            assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, (number, delays)
        assert delays == sorted(delays) and delays[-1] > delays[0], delays
        for (start, delay), (end, _) in zip(attempts, attempts[1:]):
            assert end - start >= delay - 0.05, "redialled before its delay: %s" % attempts
            assert end - start >= AGENT_BACKOFF_BASE / 2 - 0.05
        # Jitter: a backoff without it sits at each ceiling. (Distinct delays proved nothing,
        # since doubling ceilings differ anyway, and two jittered delays can print alike.)
        assert any(delay < AGENT_BACKOFF_BASE * 2 ** number - 0.05
                   for number, delay in enumerate(delays)), "no jitter: %s" % delays

        rows = wait_until(gw.sessions, 10, interval=0.2, what="the new session row")
        assert len(rows) == 1 and rows[0]["port"] == new_port
        echo_once(new_port)
        assert agent.popen.poll() is None
    finally:
        relay.close()


# ----- limits -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stream_cap_resets_the_extra_client_and_keeps_the_others(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw", max_streams=4).start()
    agent = gw.agent("foo", echo_backend.address)
    clients = [connect(agent.port) for _ in range(4)]
    for number, sock in enumerate(clients):
        round_trip(sock, b"client %d" % number)

    started = time.monotonic()
    with pytest.raises(ConnectionResetError):  # in connect() already, or at the first read
        with connect(agent.port, timeout=2) as extra:
            extra.recv(1)
    assert time.monotonic() - started < 0.5

    for number, sock in enumerate(clients):
        round_trip(sock, b"still there %d" % number)
    clients.pop().close()
    wait_until(lambda: gw.http_get("/debug/stats")["streams"] == 3, 5, what="a freed stream")
    with connect(agent.port) as sock:  # the freed slot is usable again
        round_trip(sock, b"fifth, later")
    for sock in clients:
        sock.close()


@pytest.mark.timeout(60)
def test_burst_of_300_clients_all_get_their_echo(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    agent = gw.agent("foo", echo_backend.address)
    clients = [connect(agent.port, timeout=20) for _ in range(300)]
    try:
        for number, sock in enumerate(clients):
            sock.sendall(b"client %05d" % number)
        for number, sock in enumerate(clients):
            expected = b"client %05d" % number
            got = b""
            while len(got) < len(expected):
                data = sock.recv(64)
                assert data, "client %d got EOF" % number
                got += data
            assert got == expected
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.timeout(60)
def test_open_rate_queues_new_streams_instead_of_refusing(tmp_path, echo_backend):
    rate, burst, count = 20, 10, 60
    gw = Gateway(tmp_path / "gw", open_rate=rate, open_burst=burst).start()
    agent = gw.agent("foo", echo_backend.address)
    time.sleep(0.6)  # the bucket is full anyway; let the agent's first pings settle
    started = time.monotonic()
    clients = [connect(agent.port, timeout=20) for _ in range(count)]
    try:
        for number, sock in enumerate(clients):
            sock.sendall(b"%03d" % number)
        for number, sock in enumerate(clients):
            sock.settimeout(20)
            got = b""
            while len(got) < 3:
                data = sock.recv(3 - len(got))
                assert data, "client %d was refused" % number
                got += data
            assert got == b"%03d" % number
        took = time.monotonic() - started
    finally:
        for sock in clients:
            sock.close()
    expected = (count - burst) / rate
    assert expected * 0.8 <= took <= expected + 3, "%d opens took %.2f s, expected ~%.1f s" % (
        count, took, expected)


# ----- admission ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stalled_handshakes_from_one_source_do_not_lock_out_another(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw", per_source_startups=2, penalty_max=5).start()
    port = gw.agent_address[1]
    stalled = [raw_connection("127.0.0.2", port) for _ in range(20)]
    try:
        answers = [first_bytes(sock, 2) for sock in stalled[2:]]  # beyond the per-source cap
        assert all(answer == BUSY_REJECT for answer in answers), answers
        agent = gw.agent("foo", echo_backend.address, wait=False)
        agent.wait_up(timeout=HANDSHAKE_TIMEOUT)  # in at once, not after the stalls time out
        echo_once(agent.port)
        for sock in stalled[:2]:  # the two admitted ones are cut at the handshake timeout
            assert first_bytes(sock, HANDSHAKE_TIMEOUT + 1) == b""
    finally:
        for sock in stalled:
            sock.close()


def offend(sock):
    """Send junk on an admitted connection; returns when the server has closed it."""
    sock.sendall(JUNK)
    assert first_bytes(sock, 2) == b""  # closed without a word
    sock.close()
    return time.monotonic()


def penalised_for(source, port, since, limit):
    """Seconds from ``since`` until ``source`` is admitted again (a try refused with BUSY is
    no new offence). Returns (seconds, the admitted socket) for the caller to use."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        sock = raw_connection(source, port)
        answer = first_bytes(sock, 0.1)
        if answer is None:  # silent: the server waits for our handshake
            return time.monotonic() - 0.1 - since, sock
        assert answer == BUSY_REJECT, answer
        sock.close()
        time.sleep(0.05)
    raise AssertionError("%s still refused after %.0f s" % (source, limit))


@pytest.mark.timeout(90)
def test_junk_is_penalised_briefly_capped_and_only_for_its_source(tmp_path, echo_backend):
    penalty_max = 5
    gw = Gateway(tmp_path / "gw", per_source_startups=2, penalty_max=penalty_max).start()
    port = gw.agent_address[1]

    offended = offend(raw_connection("127.0.0.3", port))
    assert first_bytes(raw_connection("127.0.0.3", port), 1) == BUSY_REJECT
    bystander = raw_connection("127.0.0.4", port)
    assert first_bytes(bystander, 0.2) is None, "another source was refused"
    bystander.close()

    penalties = []
    for number in range(4):  # offend again as soon as admitted: 1, 2, 4, then capped at 5 s
        seconds, sock = penalised_for("127.0.0.3", port, offended, penalty_max + 3)
        penalties.append(seconds)
        offended = offend(sock)
        if number == 1:  # an agent from 127.0.0.1 gets in while 127.0.0.3 is penalised
            agent = gw.agent("foo", echo_backend.address)
            assert first_bytes(raw_connection("127.0.0.3", port), 1) == BUSY_REJECT
            echo_once(agent.port)
    seconds, sock = penalised_for("127.0.0.3", port, offended, penalty_max + 3)
    penalties.append(seconds)
    sock.close()
    print("penalties: %s" % ["%.2f" % p for p in penalties])
    assert 0.8 <= penalties[0] <= 1.5, penalties
    assert penalties[1] > penalties[0] and penalties[2] > penalties[1], penalties
    assert max(penalties) <= penalty_max + 0.6, "penalty not capped: %s" % penalties
    assert penalties[-1] >= penalty_max - 1, "penalty did not grow to its cap: %s" % penalties


@pytest.mark.timeout(60)
def test_debug_stats_return_to_baseline_after_junk_and_stalls(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw").start()
    agent = gw.agent("foo", echo_backend.address)
    echo_once(agent.port)
    time.sleep(0.5)
    before = gw.http_get("/debug/stats")
    assert before["pending_handshakes"] == 0

    port = gw.agent_address[1]
    stalled = [raw_connection("127.0.0.%d" % (10 + n % 5), port) for n in range(15)]
    for _ in range(30):
        sock = raw_connection("127.0.0.20", port)
        sock.sendall(JUNK + b"\x00" * 64)
        sock.close()
    time.sleep(0.3)
    during = gw.http_get("/debug/stats")
    assert during["pending_handshakes"] >= 10, during
    try:
        stats = wait_until(
            lambda: (lambda s: s["pending_handshakes"] == 0 and s)(gw.http_get("/debug/stats")),
            HANDSHAKE_TIMEOUT + 2, interval=0.2, what="pending handshakes back to 0")
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(0.5)
    stats = gw.http_get("/debug/stats")
    assert stats["pending_handshakes"] == 0
    assert stats["greenlets"] <= before["greenlets"] + 5, (before, stats)
    assert stats["handshake_failures"].get("timeout", 0) >= 10, stats
    assert stats["agents"] == 1
    echo_once(agent.port)


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for this test; skips when mounting is not permitted."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    result = run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "diglett-test",
                 str(mountpoint))
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): %s" % result.stderr.strip())
    yield mountpoint
    for _ in range(20):  # the server may still hold files open for a moment
        if run("umount", str(mountpoint)).returncode == 0:
            break
        time.sleep(0.25)
    else:
        run("umount", "-l", str(mountpoint))


def fill_up(mountpoint):
    filler = mountpoint / "filler"
    with open(filler, "wb") as out:
        block = bytes(65536)
        try:
            while True:
                out.write(block)
                out.flush()
        except OSError:
            pass
    return lambda: filler.unlink()


def probe_echo(port, seconds):
    """Echo round trips for ``seconds``; returns (round trips, failures)."""
    done, failures = 0, []
    deadline = time.monotonic() + seconds
    with connect(port, timeout=10) as sock:
        while time.monotonic() < deadline:
            try:
                harness.round_trips(sock, 1)
                done += 1
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
                break
            time.sleep(0.01)
    return done, failures


NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups"]


class NobodyGateway(Gateway):
    """A Gateway whose server and diglett-admin run as user nobody (root ignores file modes)."""

    def start(self, timeout=15):
        self.proc = harness.Proc(AS_NOBODY + harness.command("diglett-server") +
                                 ["-c", str(self.config_path)], self.workdir, "server")
        match = self.proc.wait_for(harness.READY, timeout)
        self.agent_address = (match.group(1), int(match.group(2)))
        self.http_address = (match.group(3), int(match.group(4)))
        self.key = match.group(5)
        return self

    def admin(self, *args, check=True, timeout=30):
        result = subprocess.run(AS_NOBODY + harness.command("diglett-admin") +
                                ["-c", str(self.config_path), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError("diglett-admin %s failed: %s" % (args, result.stderr))
        return result


@pytest.fixture
def nobody_folder():
    """A folder under /tmp that user nobody can use (pytest's tmp_path is private to root)."""
    if run("setpriv", "--reuid=%d" % NOBODY, "true").returncode != 0:
        pytest.skip("cannot run a process as user nobody here")
    folder = Path(tempfile.mkdtemp(prefix="diglett-plan-"))
    os.chmod(folder, 0o755)
    os.chown(folder, NOBODY, NOBODY)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_read_only(folder):
    """chmod 0444 the database and its WAL files (plan D6 b)."""
    files = [folder / name for name in ("registry.db", "registry.db-wal", "registry.db-shm")]
    for path in files:
        if path.exists():
            path.chmod(0o444)
    return lambda: [path.chmod(0o644) for path in files if path.exists()]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_registry_read_only_or_full_keeps_tunnels_up_and_says_so(tmp_path, request,
                                                                  echo_backend, fault):
    if fault == "full":
        disk = request.getfixturevalue("small_disk")
        gateway = Gateway(tmp_path / "gw", database=disk / "registry.db").start()
        database = disk / "registry.db"
    else:
        folder = request.getfixturevalue("nobody_folder")
        gateway = NobodyGateway(folder / "gw")
        os.chown(gateway.workdir, NOBODY, NOBODY)
        gateway.start()
        database = gateway.workdir / "registry.db"
    foo = gateway.agent("foo", echo_backend.address)
    bar_key, bar_public = gateway.new_key("bar")
    gateway.grant("bar", bar_public)
    wait_until(lambda: len(gateway.sessions()) == 1, 5, what="foo's session row")
    time.sleep(1.2)  # the grant poll has seen bar

    restore = make_read_only(gateway.workdir) if fault == "read-only" else fill_up(disk)
    result = {}
    prober = threading.Thread(target=lambda: result.update(zip(("done", "failures"),
                                                                probe_echo(foo.port, 4))))
    prober.start()
    bar = gateway.agent("bar", echo_backend.address, key_file=bar_key, wait=False)
    bar.wait_up(timeout=15)  # OK does not wait for the session row
    with connect(bar.port, timeout=5) as sock:
        harness.round_trips(sock, 3)
    prober.join(10)
    assert not result["failures"] and result["done"] > 50, result
    foo.stop()  # an end to record too
    admin = gateway.admin("grant", "baz", "--key", bar_public, check=False)
    assert admin.returncode != 0 and "Traceback" not in admin.stderr
    assert str(database) in admin.stderr, admin.stderr
    log = gateway.proc.stderr()
    assert "Traceback" not in log
    if fault == "read-only":
        # The server's open database handle still writes (file modes are checked at open):
        # nothing is wrong for it, and the rows keep coming. Only new openers are refused.
        assert "read-only" in admin.stderr or "readonly" in admin.stderr, admin.stderr
        wait_until(lambda: [r["subdomain"] for r in gateway.sessions()] == ["bar"], 10,
                   interval=0.3, what="bar's row, and foo's ended, written meanwhile")
        assert gateway.http_get("/healthz")["status"] == "ok"
        restore()
        return
    health = wait_until(lambda: (lambda h: h["status"] == "degraded" and h)(
        gateway.http_get("/healthz")), 10, interval=0.2, what="/healthz to say degraded")
    print("%s registry: /healthz %s" % (fault, health))
    complaints = [line for line in gateway.proc.stderr().splitlines()
                  if "registry write failed" in line]
    assert len(complaints) == 1, "one line per condition, not one per retry:\n" + "\n".join(
        complaints)
    assert "full" in complaints[0].lower(), complaints[0]
    assert "full" in health["registry"].lower(), health

    restore()
    wait_until(lambda: gateway.http_get("/healthz")["status"] == "ok", 15, interval=0.2,
               what="/healthz ok once the disk is back")
    assert "registry writes work again" in gateway.proc.stderr()
    rows = wait_until(lambda: (lambda s: [r["subdomain"] for r in s] == ["bar"] and s)(
        gateway.sessions()), 10, interval=0.3, what="bar's row, and foo's ended")
    assert rows[0]["port"] == bar.port
    assert bar.popen.poll() is None


# ----- D3: backends that hang, or come up late ---------------------------------------------
@pytest.mark.timeout(40)
def test_hanging_backend_is_reclaimed_at_the_idle_timeout_and_others_flow(tmp_path):
    release = threading.Event()
    backend = Backend(harness.by_first_byte({b"H": harness.stall(release), b"E": echo}))
    try:
        gateway = Gateway(tmp_path / "gw", stream_idle_timeout=2).start()
        agent = gateway.agent("foo", backend.address)
        hung = connect(agent.port)
        hung.sendall(b"H")
        busy = connect(agent.port)
        busy.sendall(b"E")
        started = time.monotonic()
        while time.monotonic() - started < 4:  # the busy stream keeps moving meanwhile
            harness.round_trips(busy, 1)
            time.sleep(0.2)
        hung.settimeout(5)
        with pytest.raises(ConnectionResetError):  # reclaimed with a reset, not an EOF
            hung.recv(1)
        harness.round_trips(busy, 5)
        wait_until(lambda: gateway.http_get("/debug/stats")["streams"] == 1, 5,
                   what="only the busy stream left")
        hung.close()
        busy.close()
    finally:
        release.set()
        backend.close()


@pytest.mark.timeout(40)
def test_backend_that_accepts_late_gets_the_clients_early_bytes(gateway):
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)  # the kernel queues connects
    received = {}

    def accept_late():
        time.sleep(3)
        sock, _ = listener.accept()
        with sock:
            data = harness.recv_exact(sock, 100000)
            received["data"] = data
            sock.sendall(b"got it")
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=accept_late, daemon=True).start()
    try:
        agent = gateway.agent("late", listener.getsockname()[:2])
        payload = os.urandom(100000)
        with connect(agent.port, timeout=10) as client:
            client.sendall(payload)  # before the backend accepts: buffered within the window
            client.settimeout(10)
            assert harness.recv_exact(client, 6) == b"got it"
            assert client.recv(1) == b""
        assert received["data"] == payload
    finally:
        listener.close()
    assert "CONNECT_FAILED" not in agent.stderr()


# ----- E3: a download through Traefik while the agent link is blackholed ---------------------
class BigBody:
    """/sized: 256 MiB with a Content-Length; /chunked: 256 MiB chunked. Counts bytes sent."""

    def __init__(self):
        self.sent = {}
        outer = self
        block = harness.pattern(256 * KiB, b"big")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                chunked = self.path == "/chunked"
                self.send_response(200)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(1024 * len(block)))
                self.end_headers()
                for _ in range(1024):
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    else:
                        self.wfile.write(block)
                    outer.sent[self.path] = outer.sent.get(self.path, 0) + len(block)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):
                pass

        self.server = serve_http(Handler)
        self.address = self.server.server_address

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_download_through_traefik_fails_visibly_when_the_agent_link_goes_dark(tmp_path,
                                                                               traefik):
    dead_after = float(harness.TEST_SERVER_OPTIONS["dead_after"])
    gw = Gateway(tmp_path / "gw", sections={
        "hooks": {"enabled": "traefik", "retry_max": "1"},
        "hook:traefik": {"api": traefik.api, "entrypoints": "web", "check_interval": "1",
                         "settle": "3"}}).start()
    relay = FaultRelay(gw.agent_address)
    backend = BigBody()
    curls = {}
    try:
        agent_via(gw, "big", backend.address, relay.gateway, "agent-big")
        wait_until(lambda: traefik.status("big.example.test") not in (None, 404), 10,
                   interval=0.1, what="Traefik to route big")
        for path in ("/sized", "/chunked"):
            curls[path] = subprocess.Popen(
                ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "4M", "-m", "40",
                 "-w", "%{http_code} %{size_download}", "-H", "Host: big.example.test",
                 "http://127.0.0.1:%d%s" % (traefik.web_port, path)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: min(backend.sent.get(path, 0) for path in curls) >= 8 * MiB, 15,
                   interval=0.05, what="both downloads under way")
        time.sleep(0.5)  # the first bytes are through Traefik: curl counts them below
        relay.blackhole()
        dark = time.monotonic()
        outcomes = {}
        for path, curl in curls.items():
            out, err = curl.communicate(timeout=dead_after + 20)
            outcomes[path] = (curl.returncode, out, err.strip(), time.monotonic() - dark)
        print("curl after the blackhole: %r" % outcomes)
        for path, (code, out, err, seconds) in outcomes.items():
            status, size = out.split()
            assert code in (18, 56) or status == "502", "%s: curl exit %d (%s %s): the abort " \
                "looked like a complete reply" % (path, code, out, err)
            assert int(size) < 256 * MiB
            assert seconds <= dead_after + 10, "%s failed only %.1f s after dark" % (
                path, seconds)
    finally:
        for curl in curls.values():
            if curl.poll() is None:
                curl.kill()
                curl.wait(5)
        relay.close()
        backend.close()
