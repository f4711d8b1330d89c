"""Limits that keep a gateway alive: idle streams are reclaimed, buffered memory is bounded."""

import json
import socket
import time
import urllib.request

import pytest

from tests import harness


def metric(gateway, name):
    url = "http://%s:%d/metrics" % gateway.http_address
    with urllib.request.urlopen(url, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "_total "):
                return float(line.split()[-1])
    return None


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
