"""Socket helpers shared by the tunnel, the stream pumps, the server and the agent.

Options that decide how a connection ends (a reset rather than a FIN that would make a cut
transfer look complete), scatter-gather writes without a joining copy, and exact reads for the
handshake's fixed-size messages. No protocol knowledge here.
"""

import socket
import struct

import gevent.socket

LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
LINGER_OFF = struct.pack("ii", 0, 0)  # the default: close() sends FIN after queued data
IOV_MAX = 1024  # buffers per sendmsg (the Linux limit)
MSG_DONTWAIT = socket.MSG_DONTWAIT  # a write that must not wait: gevent raises instead


def kernel_socket(sock):
    """The non-blocking socket under a gevent socket (itself if it is not one), for calls
    that must never wait (timeout 0): the same result or BlockingIOError, without gevent's
    Python-level wrapper, a frame per call on the round trip's path. Waiting, closing and
    options stay with the gevent socket."""
    # The exact class: a subclass (gevent's SSLSocket) or a wrapper forwarding attributes
    # (TlsSocket) has a _sock too, and under it the TCP socket with the other side's bytes.
    if type(sock) is not gevent.socket.socket:
        return sock
    return sock._sock  # gevent keeps the real socket here, always non-blocking


def set_nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (tests may use socketpairs)


def sendall_buffers(sock, buffers, wait_writable=None):
    """sendall for a list of buffers in one scatter-gather write each turn (no joining copy).
    A socket whose timeout is 0 needs ``wait_writable()`` to wait when the kernel is full."""
    views = [memoryview(buffer) for buffer in buffers]
    first = 0
    while first < len(views):
        try:
            sent = sock.sendmsg(views[first:first + IOV_MAX])
        except BlockingIOError:
            if wait_writable is None:
                raise
            wait_writable()
            continue
        while sent and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


def rest_after(buffers, sent):
    """The views of ``buffers`` after the first ``sent`` bytes."""
    rest = []
    for buffer in buffers:
        if sent >= len(buffer):
            sent -= len(buffer)
        else:
            rest.append(memoryview(buffer)[sent:])
            sent = 0
    return rest


def recv_exact(sock, size):
    """Exactly ``size`` bytes (the handshake's fixed-size messages), or ConnectionError."""
    chunks = []
    left = size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("connection closed after %d of %d bytes"
                                  % (size - left, size))
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def enable_keepalive(sock):
    """Kernel keepalive and a user timeout: a second line behind the protocol's pings, so
    sends into a silently dropped path fail instead of filling buffers for minutes."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", 30000)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass


def reset_unless_finished(sock):
    """Make every close of ``sock`` a reset until Pump finishes the stream cleanly, so a
    process that dies (kill -9) resets its clients instead of the kernel sending a FIN
    that makes a truncated download look complete."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass


def close_with_rst(sock):
    """Abort a connection so the peer sees a reset, never a clean EOF after a short read."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()
