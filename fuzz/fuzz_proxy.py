"""atheris target: the PROXY protocol header reader (diglett.proxyproto, server.read_proxy_header).

The input is what a trusted proxy sends first; the server's own reader takes it through a
socket stand-in that hands out at most 7 bytes a call. Allowed outcome: a Header that took
exactly its own bytes, proxyproto.HeaderError, or ConnectionError at the end of the input,
with never more than MAX_HEADER_SIZE bytes read.
"""

from common import instrumented, run

with instrumented():
    from diglett import proxyproto
    from diglett.server import read_proxy_header  # imports gevent; patches nothing


class Feed:
    def __init__(self, data):
        self.data, self.taken = data, 0

    def recv(self, size):
        chunk = self.data[self.taken:self.taken + min(size, 7)]
        self.taken += len(chunk)
        return chunk


def target(data):
    try:
        proxyproto.parse(data)
    except proxyproto.HeaderError:
        pass
    sock = Feed(data)
    try:
        header = read_proxy_header(sock)
    except (proxyproto.HeaderError, ConnectionError):
        header = None
    if sock.taken > proxyproto.MAX_HEADER_SIZE:
        raise AssertionError("read %d bytes of a PROXY header" % sock.taken)
    if header is not None and header.size != sock.taken:
        raise AssertionError("took %d bytes for a %d-byte header" % (sock.taken, header.size))


if __name__ == "__main__":
    run(target)
