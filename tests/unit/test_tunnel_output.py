"""Tunnel.send_soon must leave nothing queued without waking the writer: a session holding
more than one call of buffers_to_send returns (OUTPUT_CHUNK) used to send the first part and
leave the rest until the next PING woke the writer (ping_interval, 10 s by default), which
stalled an upload among several (bench/aggregate.py: one stream waited the full interval)."""

import collections

import gevent
import pytest
from gevent import socket

from diglett.tunnel import Tunnel

CHUNK = 64 * 1024  # bytes per buffers_to_send call of the fake session


class QueuedOutput:
    """A session as the Tunnel sees it, holding only output: one chunk per call."""

    def __init__(self):
        self.chunks = collections.deque()

    @property
    def has_output(self):
        return bool(self.chunks)

    def buffers_to_send(self):
        return [self.chunks.popleft()] if self.chunks else []

    def receive_data(self, data):
        return []

    def ping(self, payload):
        pass


@pytest.mark.timeout(20)
def test_output_beyond_one_chunk_goes_out_without_waiting_for_a_ping():
    ours, theirs = socket.socketpair()
    session = QueuedOutput()
    tunnel = Tunnel(ours, session, label="test", ping_interval=60, dead_after=180)
    tunnel.start()
    gevent.sleep(0.1)  # the writer has flushed what start() woke it for, and waits
    session.chunks.extend(bytes([n]) * CHUNK for n in range(3))
    tunnel.send_soon()
    received = bytearray()
    theirs.settimeout(3)
    try:
        while len(received) < 3 * CHUNK:
            data = theirs.recv(1 << 20)
            if not data:
                break
            received += data
    except socket.timeout:
        pass
    finally:
        tunnel.close("shutdown")
        tunnel.wait()
        theirs.close()
    assert len(received) == 3 * CHUNK, "%d of %d bytes sent; the rest waits for a ping" % (
        len(received), 3 * CHUNK)
    assert not session.has_output
