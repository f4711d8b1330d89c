"""TlsSocket under the tunnel's own write and read calls: a real TLS connection in one process,
the sender's kernel buffer made to fill (so OpenSSL says "again" and the retry must repeat the
same bytes), the reader driven non-blocking as the tunnel's watcher drives it."""

import hashlib
import os
import random
from types import SimpleNamespace

import gevent
import pytest
from gevent import socket

from diglett.gateway.transports import server_context
from diglett.reach import certificate
from diglett.reach.tls_socket import WRITE_SIZE, TlsSocket
from diglett.reach.transport import client_tls
from diglett.sockets import sendall_buffers

pytestmark = pytest.mark.timeout(30)


def tls_pair(tmp_path):
    cert, key = certificate.files(SimpleNamespace(tls_cert=None, tls_key=None,
                                                  key=tmp_path / "server.key"))
    context = server_context(cert, key, domain="example.test")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client_raw = socket.create_connection(listener.getsockname())
    server_raw, _ = listener.accept()
    for sock in (client_raw, server_raw):  # small buffers: the writer meets a full kernel often
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    accepting = gevent.spawn(TlsSocket.server, context, server_raw)
    client = client_tls(client_raw, "tunnel.example.test")
    return client, accepting.get(timeout=10)


def read_nonblocking(sock, size):
    """As Tunnel._readable: wait for the fd, then recv until BlockingIOError."""
    digest, total = hashlib.sha256(), 0
    while total < size:
        try:
            data = sock.recv(256 * 1024)
        except BlockingIOError:
            socket.wait_read(sock.fileno())
            continue
        assert data, "EOF after %d bytes" % total
        digest.update(data)
        total += len(data)
        if random.random() < 0.05:
            gevent.sleep(0.002)  # a slow reader: the writer's kernel buffer fills up
    return digest.hexdigest()


def test_the_tunnels_write_and_read_calls_carry_bytes_intact(tmp_path):
    sender, receiver = tls_pair(tmp_path)
    sender.settimeout(0.0)
    receiver.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        receiver.recv(1024)  # nothing yet: what the watcher-driven reader expects
    rng = random.Random(11)
    buffers = [os.urandom(rng.choice([1, 57, 1400, 16384, 70000])) for _ in range(300)]
    size = sum(map(len, buffers))
    reading = gevent.spawn(read_nonblocking, receiver, size)
    sendall_buffers(sender, buffers, lambda: socket.wait_write(sender.fileno()))
    assert reading.get(timeout=20) == hashlib.sha256(b"".join(buffers)).hexdigest()


def test_a_partial_write_reports_a_prefix_that_a_retry_continues(tmp_path):
    sender, receiver = tls_pair(tmp_path)
    sender.settimeout(0.0)
    payload = os.urandom(4 * 1024 * 1024)
    sent = 0
    with pytest.raises(BlockingIOError):  # the kernel buffers (32 KiB asked) fill up: wait
        for _ in range(len(payload) // WRITE_SIZE):  # how many fit depends on the kernel
            taken = sender.sendmsg([memoryview(payload)[sent:]])
            assert taken == WRITE_SIZE  # one WRITE_SIZE per call, its ciphertext flushed later
            sent += taken
    assert 0 < sent < len(payload)
    receiver.settimeout(0.0)
    reading = gevent.spawn(read_nonblocking, receiver, len(payload))
    rest = memoryview(payload)[sent:]
    sendall_buffers(sender, [rest], lambda: socket.wait_write(sender.fileno()))
    assert reading.get(timeout=20) == hashlib.sha256(payload).hexdigest()


def test_blocking_mode_is_the_handshakes_plain_calls(tmp_path):
    client, server = tls_pair(tmp_path)
    client.sendall(b"preamble" + b"x" * 50)
    assert server.recv(8) == b"preamble"  # the rest stays in the TLS object ...
    assert server.pending() > 0  # ... which is what tunnel.start looks at
    assert server.recv(100) == b"x" * 50
