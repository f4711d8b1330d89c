"""SIGTERM drains the server: open streams finish intact, then it exits 0; agents come back."""

import hashlib
import signal
import socket
import threading
import time

import pytest

from tests.support import harness

SIZE = 24 * 1024 * 1024


def slow_sender(sock):
    """Sends SIZE seeded bytes over about two seconds, then closes."""
    data = harness.pattern(SIZE, b"drain")
    step = len(data) // 16
    for offset in range(0, len(data), step):
        sock.sendall(data[offset:offset + step])
        time.sleep(0.12)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.timeout(60)
def test_sigterm_lets_open_streams_finish_then_exits_0(tmp_path):
    gateway = harness.Gateway(tmp_path / "gw", drain_timeout=10).start()
    backend = harness.Backend(slow_sender)
    try:
        agent = gateway.agent("slow", backend.address)
        client = harness.connect(agent.port, timeout=20)
        result = {}
        reader = threading.Thread(target=lambda: result.update(
            zip(("digest", "size"), harness.recv_all(client))))
        reader.start()
        time.sleep(0.3)  # the download is under way
        started = time.monotonic()
        gateway.proc.signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):  # no new clients while draining
            harness.connect(agent.port, timeout=2).recv(1)
        reader.join(20)
        client.close()  # the client is done too: the stream is over
        assert result["size"] == SIZE
        assert result["digest"] == hashlib.sha256(harness.pattern(SIZE, b"drain")).hexdigest()
        assert gateway.proc.wait(15) == 0
        took = time.monotonic() - started
        print("drained and exited in %.2f s" % took)
        assert took < 10, "the stream finished, so the drain should not wait for its timeout"
        assert "draining" in agent.stderr() and agent.popen.poll() is None  # retrying, not gone
        gateway.restart()
        agent.wait_up(count=2)
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_drain_timeout_resets_streams_that_do_not_finish(tmp_path):
    gateway = harness.Gateway(tmp_path / "gw", drain_timeout=1).start()
    backend = harness.Backend(lambda sock: time.sleep(30))  # never answers
    try:
        agent = gateway.agent("stuck", backend.address)
        client = harness.connect(agent.port, timeout=20)
        client.sendall(b"hello")
        time.sleep(0.3)
        started = time.monotonic()
        gateway.proc.signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            client.recv(1)  # reset at the drain timeout, never a clean EOF
        assert gateway.proc.wait(15) == 0
        took = time.monotonic() - started
        print("exited %.2f s after SIGTERM with drain_timeout 1" % took)
        assert 0.9 < took < 1 + 3 + 2  # drain_timeout + shutdown_timeout + slack
        assert "resetting 1 open streams" in gateway.proc.stderr()
    finally:
        backend.close()
