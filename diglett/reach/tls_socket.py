"""A TLS connection that the tunnel code can drive as it drives a plain socket.

diglett.tunnel reads from a watcher with the socket's timeout at 0, expecting BlockingIOError
when nothing is there, and writes with ``sendmsg(buffers, (), MSG_DONTWAIT)`` and
``sendall_buffers``. An ssl socket has no sendmsg and signals "not now" with SSLWantRead /
SSLWantWrite errors; TlsSocket translates, so TLS needs no relay (diglett.reach.splice) and
costs only the TLS work itself. Every other call goes to the ssl socket unchanged.

Two rules of OpenSSL shape it. A write that could not finish must be repeated with the same
bytes, and Python's ssl has no partial writes: a 256 KiB SSL_write that fills the kernel's
buffer says "again" and must be handed the whole 256 KiB again, record after record. So a
sendmsg writes one record (RECORD_SIZE) per SSL_write and reports how many went: the tunnel's
retry then starts at the record that had to wait, the same bytes. A read returns one record
at most: ``recv`` goes on reading records while they are there, so the tunnel sees about as
much per call as from TCP, and no decrypted byte is left behind where the watcher cannot see
it (``pending`` tells the tunnel's start about any that are).
"""

import ssl

RECORD_SIZE = 16 * 1024  # the largest TLS plaintext record
WRITE_SIZE = 64 * 1024  # bytes one sendmsg takes at most (joined once per call)


class TlsSocket:
    def __init__(self, tls):
        self.tls = tls  # a gevent ssl socket, handshake done

    def __getattr__(self, name):  # fileno, setsockopt, getpeername, close, settimeout...
        return getattr(self.tls, name)

    def pending(self):
        return self.tls.pending()

    def recv(self, size):
        tls = self.tls
        if tls.gettimeout() != 0.0:
            return tls.recv(size)  # the handshake's blocking reads
        try:  # one record per read: a bigger size would only allocate a bigger buffer
            data = tls.recv(RECORD_SIZE)
        except ssl.SSLWantReadError:
            raise BlockingIOError("no TLS record yet") from None
        if not data:
            return data
        chunks, total = [data], len(data)
        while total < size:
            try:
                more = tls.recv(RECORD_SIZE)
            except ssl.SSLWantReadError:
                break
            if not more:
                break  # EOF: the next recv returns it
            chunks.append(more)
            total += len(more)
        return b"".join(chunks) if len(chunks) > 1 else data

    def sendmsg(self, buffers, _ancillary=(), _flags=0):
        """Bytes written of ``buffers`` (a prefix); BlockingIOError when none could be."""
        data = _prefix(buffers, WRITE_SIZE)
        tls = self.tls
        if tls.gettimeout() != 0.0:
            tls.sendall(data)
            return len(data)
        view, sent = memoryview(data), 0
        while sent < len(data):
            done = tls.send(view[sent:sent + RECORD_SIZE])  # gevent: 0 for SSLWantWrite
            if not done:
                break
            sent += done
        if not sent:
            raise BlockingIOError("TLS write must wait")
        return sent

    def send(self, data, _flags=0):
        return self.sendmsg([data])

    def sendall(self, data):
        self.tls.sendall(data)


def _prefix(buffers, limit):
    """The first ``limit`` bytes of ``buffers``, joined (the same bytes on every retry)."""
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
