"""Limits that keep a gateway alive: idle streams are reclaimed, buffered memory is bounded,
slow HTTP clients (byte-by-byte headers) cannot starve the API or take the descriptors agents
need, an agent that never reads is closed at write_stall_timeout, and under an address-space
limit the memory budget keeps the server serving and ends only the session that hit it
(test plan C2 b, C5, C7 b). Real processes on 127.0.0.1; every loop is bounded."""

import json
import re
import socket
import threading
import time
import urllib.request

import pytest

from diglett import protocol
from tests.support import harness, peers
from tests.support.harness import Backend, Gateway, connect, echo, port_closed, wait_until
from tests.support.hookfixtures import (
    traefik,  # noqa: F401 (a fixture)
)
from tests.support.probes import (
    MiB,
    echo_ok,
    fd_count,
    metric,
    start_limited_server,
    timed_get,
    vm_status,
)


@pytest.mark.timeout(40)
def test_idle_streams_are_reset_and_busy_ones_are_not(tmp_path, echo_backend):
    gateway = harness.Gateway(tmp_path / "gw", stream_idle_timeout=1).start()
    agent = gateway.agent("idle", echo_backend.address)
    idle = harness.connect(agent.port)
    busy = harness.connect(agent.port)
    started = time.monotonic()
    while time.monotonic() - started < 3:  # the busy stream moves a byte every 0.3 s
        busy.sendall(b"b")
        assert busy.recv(1) == b"b"
        time.sleep(0.3)
    with pytest.raises(ConnectionResetError):  # reset, never a clean EOF
        idle.settimeout(5)
        idle.recv(1)
    busy.sendall(b"still")
    assert busy.recv(5) == b"still"
    assert metric(gateway, "diglett_idle_stream_resets") >= 1
    assert "streams idle for 1 s" in gateway.proc.stderr()


@pytest.mark.timeout(60)
def test_memory_budget_refuses_new_streams_then_recovers(tmp_path):
    counter = {}
    backend = harness.Backend(harness.flood(counter))
    gateway = harness.Gateway(tmp_path / "gw", stream_window="64K", memory_budget="256K").start()
    try:
        agent = gateway.agent("budget", backend.address)
        stalled = []
        for _ in range(8):  # clients that never read: each stream buffers one window
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                sock.connect(("127.0.0.1", agent.port))
            except ConnectionResetError:  # the budget is reached already: refused at once
                sock.close()
                continue
            stalled.append(sock)
            time.sleep(0.3)
        buffered = harness.wait_until(
            lambda: (metric(gateway, "diglett_buffered_bytes") or 0) > 0.75 * 256 * 1024 and
            metric(gateway, "diglett_buffered_bytes"), 10, what="the budget to fill")
        assert buffered <= 256 * 1024 + 8 * 64 * 1024, "each stalled stream holds one window"
        with pytest.raises(ConnectionResetError):  # maybe already while connecting
            probe = harness.connect(agent.port)
            probe.settimeout(5)
            probe.recv(1)  # reset at once: a proxy answers 502 instead of hanging
        assert metric(gateway, "diglett_memory_budget_refusals") >= 1
        for sock in stalled:
            sock.close()
        harness.wait_until(lambda: metric(gateway, "diglett_buffered_bytes") == 0, 10,
                           what="the buffers to drain")
        def served():  # new streams are served again (the refusal lifts by itself)
            try:
                with harness.connect(agent.port) as fresh:
                    return len(fresh.recv(65536)) > 0
            except ConnectionResetError:
                return False

        harness.wait_until(served, 10, interval=0.2, what="a new stream to be served")
        tunnels = json.loads(urllib.request.urlopen(
            "http://%s:%d/api/tunnels" % gateway.http_address, timeout=5).read())
        assert tunnels and tunnels[0]["subdomain"] == "budget"
    finally:
        backend.close()


HTTP_SLOW = 1.0  # seconds: generous bound for /healthz and /info while slow clients hold on


# ----- C2 (b): slowloris on the HTTP port ---------------------------------------------------
SLOW_HEADER = b"GET /info HTTP/1.1\r\nHost: slow.example.test\r\nX-Slow: aaaaaaaaaaaaaaaaaa"


def slow_clients(address, count):
    return [socket.create_connection(address, timeout=5) for _ in range(count)]


@pytest.mark.timeout(40)
def test_http_api_answers_while_100_clients_send_headers_byte_by_byte(tmp_path):
    gw = Gateway(tmp_path / "gw").start()
    baseline = fd_count(gw.proc.pid)
    clients = slow_clients(gw.http_address, 100)
    try:
        answers = []
        for offset in range(40):  # one byte per client every 0.1 s: 4 s, the header never ends
            for sock in clients:
                sock.sendall(SLOW_HEADER[offset:offset + 1])
            if offset % 4 == 0:
                answers.append(timed_get(gw, "/healthz"))
                answers.append(timed_get(gw, "/info"))
            time.sleep(0.1)
        held = fd_count(gw.proc.pid) - baseline
        worst = max(seconds for seconds, _ in answers)
        print("%d answers while 100 slow clients held %d server fds; slowest %.3f s" % (
            len(answers), held, worst))
        assert worst < HTTP_SLOW
        assert all(body.get("status") == "ok" or body.get("key") == gw.key
                   for _, body in answers)
    finally:
        for sock in clients:
            sock.close()
    wait_until(lambda: fd_count(gw.proc.pid) <= baseline + 2, 10, what="fds back to baseline")


@pytest.mark.timeout(60)
def test_http_slowloris_cannot_take_the_fds_agents_need(tmp_path, echo_backend):
    gw = start_limited_server(Gateway(tmp_path / "gw"), ["--nofile=200"])
    agent = gw.agent("first", echo_backend.address)
    clients = []
    try:
        for _ in range(250):  # more than the server's fd limit
            try:
                sock = socket.create_connection(gw.http_address, timeout=2)
                sock.sendall(SLOW_HEADER[:20])
                clients.append(sock)
            except OSError:
                break
        time.sleep(1)
        print("%d slow HTTP clients connected; server holds %d fds" % (
            len(clients), fd_count(gw.proc.pid)))
        try:
            echo_ok(agent.port)
        except OSError as exc:
            raise AssertionError("a connected agent's tunnel port no longer takes clients: "
                                 "%r" % exc) from None
        late = gw.agent("late", echo_backend.address, wait=False)
        late.wait_up(timeout=10)
        echo_ok(late.port)
    finally:
        for sock in clients:
            sock.close()


# ----- C5: an agent that never reads its session socket -------------------------------------
def push(port, size, errors):
    """A client that writes ``size`` bytes to a tunnel port (it may block: backpressure)."""
    try:
        with connect(port, timeout=30) as sock:
            sock.sendall(bytes(size))
            sock.recv(1)
    except OSError as exc:
        errors.append(exc)


@pytest.mark.timeout(60)
def test_agent_that_never_reads_is_closed_at_write_stall_timeout(tmp_path, echo_backend):
    stall_timeout = 2.0
    gw = Gateway(tmp_path / "gw", write_stall_timeout=stall_timeout, dead_after=30).start()
    other = gw.agent("other", echo_backend.address)
    key_file, public = gw.new_key("mute")
    gw.grant("mute", public)
    mute, answer = peers.login(gw, key_file, "mute")
    assert isinstance(answer, protocol.Accepted), answer
    port = next(row["port"] for row in gw.sessions() if row["subdomain"] == "mute")
    rss_before = harness.vm_rss(gw.proc.pid)
    # From here the test agent reads nothing. 8 streams x 4 MiB is more than the credit the
    # server gives (a window per stream) plus every socket buffer between it and the agent.
    errors, clients = [], []
    started = time.monotonic()
    for _ in range(8):
        thread = threading.Thread(target=push, args=(port, 4 * MiB, errors), daemon=True)
        thread.start()
        clients.append(thread)
    try:
        peak = 0
        while not port_closed(port):
            assert time.monotonic() - started < stall_timeout + 15, "the mute agent was kept"
            peak = max(peak, harness.vm_rss(gw.proc.pid))
            echo_ok(other.port)  # the server stays responsive to other agents throughout
            time.sleep(0.2)
        closed_after = time.monotonic() - started
        print("mute session closed %.2f s after clients started pushing (write_stall_timeout "
              "%.0f s); server RSS +%.1f MiB at most" % (closed_after, stall_timeout,
                                                          (peak - rss_before) / MiB))
        assert (peak - rss_before) < 64 * MiB
        wait_until(lambda: "peer stopped reading" in gw.proc.stderr(), 5,
                   what="the write-stall log line")
        assert re.search(r"subdomain=mute .*ended reason=\S+ \(peer stopped reading",
                         gw.proc.stderr()), gw.proc.stderr()[-2000:]
        wait_until(lambda: [r["subdomain"] for r in gw.sessions()] == ["other"], 5,
                   what="only the other session left")
        echo_ok(other.port)
        for thread in clients:
            thread.join(10)
    finally:
        mute.close()


# ----- C7 (b): the server under an address-space limit -------------------------------------
def flood_backend(counter):
    block = bytes(MiB)

    def handler(sock):
        for _ in range(64):  # at most 64 MiB per stream
            sock.sendall(block)
            counter["sent"] = counter.get("sent", 0) + MiB
    return handler


def hold_readers(port, count):
    """``count`` clients that connect to a flooding backend and never read."""
    socks = []
    for _ in range(count):
        sock = connect(port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        socks.append(sock)
    return socks


@pytest.mark.timeout(60)
def test_server_under_an_address_space_limit_serves_and_the_budget_keeps_it_under(tmp_path):
    # Measured here: the server needs about 80-130 MiB of address space to start (glibc
    # shrinks its arenas under a limit) and maps ~240 MiB without one. 512 MiB is a sane cap.
    limit = 512 * MiB
    gw = start_limited_server(Gateway(tmp_path / "gw", memory_budget="32M"),
                              ["--as=%d" % limit])
    counter = {}
    flooder, echoer = Backend(flood_backend(counter)), Backend(echo)
    socks = []
    try:
        flood = gw.agent("flood", flooder.address)
        other = gw.agent("other", echoer.address)
        with connect(other.port) as probe:  # opened before: the budget refuses new streams
            harness.round_trips(probe, 3)
            socks = hold_readers(flood.port, 60)  # 60 x 2 MiB windows: 120 MiB buffered
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                assert gw.proc.popen.poll() is None, gw.proc.stderr()[-3000:]
                harness.round_trips(probe, 3)
                time.sleep(0.3)
        size = vm_status(gw.proc.pid, "VmSize")
        print("under --as=%d MiB: VmSize %.0f MiB, RSS %.0f MiB, backends sent %d MiB" % (
            limit // MiB, size / MiB, vm_status(gw.proc.pid, "VmRSS") / MiB,
            counter.get("sent", 0) // MiB))
        assert size < limit
        assert timed_get(gw, "/healthz")[1]["status"] == "ok"
        stderr = gw.proc.stderr()
        assert "MemoryError" not in stderr and "Traceback" not in stderr, stderr[-3000:]
        for sock in socks:
            sock.close()
        # Once the stalled clients are gone, new streams are served again (budget recovered).
        wait_until(lambda: _echoes(other.port), 10, interval=0.3, what="a new stream to work")
        assert gw.proc.popen.poll() is None
    finally:
        for sock in socks:
            sock.close()
        flooder.close()
        echoer.close()


def _echoes(port):
    try:
        echo_ok(port)
    except (OSError, AssertionError):
        return False
    return True


@pytest.mark.timeout(60)
def test_failed_allocation_ends_the_session_that_hit_it_at_once_with_a_log_line(tmp_path):
    """A MemoryError (the budget set far above the limit, so the kernel says no first) kills
    only the session whose greenlet hit it, at once and through the logger; the server lives."""
    limit = 300 * MiB  # just above what the server maps at rest (~240 MiB)
    gw = start_limited_server(Gateway(tmp_path / "gw", memory_budget="4G", dead_after=30),
                              ["--as=%d" % limit])
    counter = {}
    flooder = Backend(flood_backend(counter))
    socks = []
    try:
        flood = gw.agent("flood", flooder.address)
        socks = hold_readers(flood.port, 100)  # 100 x 2 MiB windows: more than the limit
        try:
            gw.proc.wait_for("MemoryError", timeout=15)
        except AssertionError:
            pytest.skip("no allocation failed under --as=%d MiB here" % (limit // MiB))
        failed_at = time.monotonic()
        # The session that hit it ends at once (not at dead_after, 30 s), with a log line.
        wait_until(lambda: re.search(r"subdomain=flood .*ended reason", gw.proc.stderr()),
                   5, what="the session that hit the MemoryError to end")
        print("session ended %.2f s after the MemoryError" % (time.monotonic() - failed_at))
        time.sleep(1)
        stderr = gw.proc.stderr()
        assert gw.proc.popen.poll() is None
        assert not re.search(r"Greenlet .* failed with MemoryError", stderr), \
            "a greenlet died of the MemoryError outside the logger: %s" % stderr[-3000:]
        assert re.search(r"^\S+ \S+ (ERROR|WARNING|CRITICAL) .*", stderr, re.M)
    finally:
        for sock in socks:
            sock.close()
        flooder.close()
    assert timed_get(gw, "/healthz")[1]["status"] == "ok"
