"""The floor of any Python design of the tunnel: a bare gevent relay, no cipher, no framing.

    python bench/pyrelay.py LISTEN_PORT TARGET_PORT

Each accepted connection gets its own upstream connection to TARGET_PORT, and bytes go
both ways from read watchers the hub calls (as diglett's pumps read): recv, then send. Two
of these in a row (bench/rtt.py's "python relay x2") make the same process hops as
diglett's server and agent, so their round trip is what diglett would cost if its record
layer and multiplexer cost nothing.
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

READ_SIZE = 65536  # below glibc's mmap threshold, as diglett reads


def _pipe(source, sink):
    def readable():
        try:
            data = source.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            watcher.stop()
            source.close()
            sink.close()
            return
        if sink.send(data) != len(data):  # a round trip's 64 bytes always fit
            raise SystemExit("short send: this relay is for round trips only")

    watcher = gevent.get_hub().loop.io(source.fileno(), 1)
    watcher.start(readable)


def main():
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=1024)
    print("listening %d" % listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        _pipe(client, upstream)
        _pipe(upstream, client)


if __name__ == "__main__":
    main()
