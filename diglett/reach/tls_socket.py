"""A TLS connection that the tunnel code drives as it drives a plain socket.

diglett.tunnel reads from a watcher with the socket's timeout at 0, expecting BlockingIOError
when nothing is there, and writes with ``sendmsg(buffers, (), MSG_DONTWAIT)`` and
``sendall_buffers``. TlsSocket gives it those calls over TLS, so TLS needs no relay
(diglett.reach.splice) and costs the TLS work and little more.

The TLS object works on memory BIOs (ssl.SSLObject) and TlsSocket does the socket I/O itself:
an ssl socket reads each record with two syscalls (header, body) and writes each with one,
where the tunnel over TCP makes one syscall per 256 KiB, and on a sandboxed kernel (gVisor)
those syscalls cost more than the cipher. Here one recv of up to READ_SIZE feeds many records,
and one send takes the records of up to WRITE_SIZE plaintext bytes at once (64 KiB: at
256 KiB the joins and the BIO read fell off malloc's heap into fresh mmapped pages, and their
page faults cost the agent a fifth of its time under gVisor, measured with py-spy).

Writes keep the socket's backpressure: new bytes are taken only once the ciphertext of the
previous ones is in the kernel; what the kernel did not take at once is flushed by a greenlet
when the socket becomes writable. Reads drain every complete record before returning, so no
decrypted byte waits where the tunnel's fd watcher cannot see it (``pending`` tells the
tunnel's start about any that do).
"""

import ssl

import gevent
from gevent import socket

READ_SIZE = 256 * 1024  # bytes read from the kernel per recv
WRITE_SIZE = 64 * 1024  # plaintext bytes encrypted per sendmsg (4 records; larger joins cost more)
RECORD_SIZE = 16 * 1024  # the largest TLS plaintext record


class TlsSocket:
    def __init__(self, sock, tls, incoming, outgoing):
        self.sock = sock  # the gevent TCP socket
        self.tls = tls  # ssl.SSLObject over incoming/outgoing
        self.incoming = incoming
        self.outgoing = outgoing
        self._out = memoryview(b"")  # ciphertext the kernel has not taken yet
        self._flusher = None

    @classmethod
    def client(cls, context, sock, server_hostname):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        return cls(sock, tls, incoming, outgoing).handshake()

    @classmethod
    def server(cls, context, sock):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        return cls(sock, tls, incoming, outgoing).handshake()

    def handshake(self):
        """Blocking, under the caller's deadline; ssl.SSLError or ConnectionError on failure."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_blocking()
                self._feed_blocking("during the TLS handshake")
            finally:
                self._send_blocking()  # our alert, if the handshake failed
        return self

    # ----- what the tunnel calls --------------------------------------------------------
    def __getattr__(self, name):  # fileno, setsockopt, getpeername, settimeout...
        return getattr(self.sock, name)

    def pending(self):
        """Bytes inside the TLS object that no fd event will announce."""
        return self.tls.pending() + self.incoming.pending

    def recv(self, size):
        if self.sock.gettimeout() != 0.0:
            return self._recv_blocking(size)
        data = self._drain()
        while not data:
            raw = self.sock.recv(READ_SIZE)  # BlockingIOError when the kernel has nothing
            if not raw:
                self.incoming.write_eof()
                return self._drain()
            self.incoming.write(raw)
            data = self._drain()
            if not data:
                raise BlockingIOError("no complete TLS record yet")
        return data

    def sendmsg(self, buffers, _ancillary=(), _flags=0):
        """Plaintext bytes taken from ``buffers`` (a prefix); BlockingIOError when none."""
        if self.sock.gettimeout() != 0.0:
            data = _prefix(buffers, WRITE_SIZE)
            self.sendall(data)
            return len(data)
        if self._out and not self._flush():
            raise BlockingIOError("TLS ciphertext still waiting for the kernel")
        data = _prefix(buffers, WRITE_SIZE)
        self.tls.write(data)  # into a memory BIO: always all of it
        self._out = memoryview(self.outgoing.read())
        if not self._flush() and self._flusher is None:
            self._flusher = gevent.spawn(self._flush_when_writable)
        return len(data)

    def send(self, data, _flags=0):
        return self.sendmsg([data])

    def sendall(self, data):
        """Blocking (the handshake's writes, and Tunnel's sendall_buffers through sendmsg)."""
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SIZE):
            self.tls.write(view[start:start + WRITE_SIZE])
            self._send_blocking()

    def close(self):
        if self._flusher is not None:
            self._flusher.kill(block=False)
        if self._out and self.sock.gettimeout() == 0.0:
            try:
                self.sock.send(self._out, socket.MSG_DONTWAIT)  # a last GOAWAY, if it fits
            except OSError:
                pass
        self.sock.close()

    # ----- the I/O ------------------------------------------------------------------------
    def _drain(self):
        """Every plaintext byte the records received so far hold."""
        chunks = []
        while True:
            try:
                chunk = self.tls.read(RECORD_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a bare EOF
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _recv_blocking(self, size):
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                if not self._feed_blocking(None):
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def _feed_blocking(self, during):
        raw = self.sock.recv(READ_SIZE)
        if not raw:
            if during:
                raise ConnectionError("connection closed %s" % during)
            self.incoming.write_eof()
            return False
        self.incoming.write(raw)
        return True

    def _send_blocking(self):
        out, self._out = bytes(self._out) + self.outgoing.read(), memoryview(b"")
        if out:
            self.sock.sendall(out)

    def _flush(self):
        """Send what the kernel takes now; True when nothing is left."""
        try:
            sent = self.sock.send(self._out, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        self._out = self._out[sent:]  # a view: no copy of the rest
        return not self._out

    def _flush_when_writable(self):
        try:
            while self._out:
                socket.wait_write(self.sock.fileno())
                self._flush()
        except OSError:
            pass  # the tunnel's reader sees the broken connection
        finally:
            self._flusher = None


def _prefix(buffers, limit):
    """The first ``limit`` bytes of ``buffers``, joined."""
    out, total = [], 0
    for buffer in buffers:
        view = memoryview(buffer)
        if total + len(view) > limit:
            out.append(view[:limit - total])
            break
        out.append(view)
        total += len(view)
        if total == limit:
            break
    return b"".join(out)
