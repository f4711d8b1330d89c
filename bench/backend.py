"""The benchmark's backend: one process that every setup forwards to, a thread per connection.

A client opens with a 9-byte header, a command byte and a u64 (big-endian) argument:

    D n   download: the backend sends n bytes, then closes (n = 2**62: until the client goes)
    U n   upload: the backend reads n bytes, then answers one byte b"K"
    E 0   echo: every byte that follows is sent back at once

Run as ``python bench/backend.py``; it prints ``listening PORT`` and serves until killed.
Threads with blocking sockets, not gevent: a relay that writes 8 KiB pieces (socat) would
otherwise cost this process one trip through the event loop per piece, and a bulk stream
could starve the echo streams of the loop; a blocked thread costs nothing and releases the GIL.
"""

import socket
import struct
import sys
import threading

HEADER = struct.Struct(">cQ")  # command, argument
BLOCK = 1 << 20  # bytes per send / recv_into in bulk loops
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
ECHO_RECV = 65536  # bytes per recv in echo mode
THREAD_STACK = 256 * 1024  # 10,000 connections are 10,000 threads


def read_header(sock):
    """(command, argument, bytes that came after the header)."""
    data = b""
    while len(data) < HEADER.size:
        more = sock.recv(4096)
        if not more:
            return None, 0, b""
        data += more
    command, argument = HEADER.unpack_from(data)
    return command, argument, data[HEADER.size:]


def download(sock, size, block=memoryview(bytes(range(256)) * (BLOCK // 256))):
    left = size
    while left > 0:
        part = block if left >= BLOCK else block[:left]
        sock.sendall(part)
        left -= len(part)


def upload(sock, size, extra):
    left = size - len(extra)
    buffer = bytearray(BLOCK)
    while left > 0:
        count = sock.recv_into(buffer, min(left, BLOCK))
        if not count:
            return
        left -= count
    sock.sendall(b"K")


def echo(sock, extra):
    if extra:
        sock.sendall(extra)
    while True:
        data = sock.recv(ECHO_RECV)
        if not data:
            return
        sock.sendall(data)


def handle(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        command, argument, extra = read_header(sock)
        if command == b"D":
            download(sock, argument)
        elif command == b"U":
            upload(sock, argument, extra)
        elif command == b"E":
            echo(sock, extra)
    except OSError:
        pass  # the client went away: normal for stalled readers and ended runs
    finally:
        sock.close()


def main():
    threading.stack_size(THREAD_STACK)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    listener.listen(BACKLOG)
    print("listening %d" % listener.getsockname()[1], flush=True)
    while True:
        try:
            sock, _address = listener.accept()
        except OSError as exc:  # EMFILE: say so, keep serving the connections we have
            print("accept failed: %s" % exc, file=sys.stderr, flush=True)
            threading.Event().wait(0.1)
            continue
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
