"""The benchmark's load generator: plain blocking sockets and one selector, no gevent.

Every function takes the port a setup exposes on 127.0.0.1 and speaks bench/backend.py's
protocol. Every loop is bounded by a count and a deadline. ``python bench/load.py hog PORT
SECONDS`` is the bulk neighbour of the fairness test, in its own process so it competes with
the measured client only through the tunnel, never through this process's GIL; ``push`` is
its upload twin (run.py's --profile samples diglett during both).
"""

import errno
import selectors
import socket
import struct
import sys
import time

HEADER = struct.Struct(">cQ")  # as in backend.py
BLOCK = 1 << 20  # bytes per recv_into / sendall in bulk loops
FOREVER = 1 << 62  # a download size no run reaches: "until the client goes away"
REQUEST = 64  # bytes per latency request
IO_TIMEOUT = 30  # seconds any single blocking socket call may take


class BenchError(Exception):
    """A transfer that did not complete: short, reset or timed out."""


def connect(port, timeout=IO_TIMEOUT):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def download(port, size):
    """Seconds to receive ``size`` bytes from the backend over one fresh connection."""
    buffer = bytearray(BLOCK)
    started = time.perf_counter()
    with connect(port) as sock:
        sock.sendall(HEADER.pack(b"D", size))
        left = size
        while left:
            count = sock.recv_into(buffer, min(left, BLOCK))
            if not count:
                raise BenchError("download ended after %d of %d bytes" % (size - left, size))
            left -= count
    return time.perf_counter() - started


def upload(port, size):
    """Seconds to send ``size`` bytes and hear the backend confirm it counted them all."""
    block = memoryview(bytes(range(256)) * (BLOCK // 256))
    started = time.perf_counter()
    with connect(port) as sock:
        sock.sendall(HEADER.pack(b"U", size))
        left = size
        while left:
            part = block if left >= BLOCK else block[:left]
            sock.sendall(part)
            left -= len(part)
        if sock.recv(1) != b"K":
            raise BenchError("upload not confirmed")
    return time.perf_counter() - started


def _round_trip(sock, message):
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        more = sock.recv(len(message) - len(got))
        if not more:
            raise BenchError("echo connection closed after %d bytes" % len(got))
        got += more
    if got != message:
        raise BenchError("echo came back different")


def kept_round_trips(port, count, warmup=50, deadline=60):
    """Latencies (seconds) of ``count`` 64-byte echoes on one kept connection."""
    times = []
    limit = time.monotonic() + deadline
    with connect(port) as sock:
        sock.sendall(HEADER.pack(b"E", 0))
        for index in range(warmup + count):
            message = (b"%08d" % index) * (REQUEST // 8)
            started = time.perf_counter()
            _round_trip(sock, message)
            if index >= warmup:
                times.append(time.perf_counter() - started)
            if time.monotonic() > limit:
                break
    return times


def fresh_round_trips(port, count, gap=0.0, deadline=60):
    """Latencies (seconds) of ``count`` fresh connections: connect, header + one 64-byte echo.

    The header and the request go out in one write, as a client's first request would.
    """
    times = []
    limit = time.monotonic() + deadline
    for index in range(count):
        message = (b"%08d" % index) * (REQUEST // 8)
        started = time.perf_counter()
        sock = connect(port)
        try:
            sock.sendall(HEADER.pack(b"E", 0) + message)
            got = b""
            while len(got) < len(message):
                more = sock.recv(len(message) - len(got))
                if not more:
                    raise BenchError("fresh connection closed after %d bytes" % len(got))
                got += more
        finally:
            sock.close()
        times.append(time.perf_counter() - started)
        if time.monotonic() > limit:
            break
        if gap:
            time.sleep(gap)
    return times


def stalled_reader(port):
    """A connection whose backend sends without end and whose client never reads."""
    sock = connect(port)
    sock.sendall(HEADER.pack(b"D", FOREVER))
    return sock


class _Conn:
    __slots__ = ("sock", "state", "got", "started")

    def __init__(self, sock):
        self.sock, self.state, self.got = sock, "connecting", b""
        self.started = time.perf_counter()


def concurrent(port, count, batch=1000, hold=None, deadline=120):
    """Open ``count`` connections (``batch`` at a time), one echo round trip on each while all
    stay open, then ``hold(count_ok)`` (e.g. a memory probe), then close them all.

    Returns {"ok", "failures", "errors", "open_s", "total_s", "answer_s"}: ``open_s`` is the
    time until the last round trip answered, ``total_s`` adds closing (``hold`` excluded), and
    ``answer_s`` has the p50, p99 and max of each connection's connect-to-echo time and how
    many took over a second (the mark of a SYN dropped by a full accept queue and resent).
    """
    message = HEADER.pack(b"E", 0) + b"x" * REQUEST
    selector = selectors.DefaultSelector()
    open_socks, errors, answers = [], {}, []
    limit = time.monotonic() + deadline

    def fail(conn, reason):
        errors[reason] = errors.get(reason, 0) + 1
        selector.unregister(conn.sock)
        conn.sock.close()

    started = time.perf_counter()
    for first in range(0, count, batch):
        pending = 0
        for _ in range(min(batch, count - first)):
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(("127.0.0.1", port))
            conn = _Conn(sock)
            if code not in (0, errno.EINPROGRESS):
                reason = errno.errorcode.get(code, str(code))
                errors[reason] = errors.get(reason, 0) + 1
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_WRITE, conn)
            pending += 1
        while pending:
            remaining = limit - time.monotonic()
            events = selector.select(timeout=max(0.0, min(remaining, 1.0)))
            if remaining <= 0:
                for key in list(selector.get_map().values()):
                    fail(key.data, "timeout")
                break
            for key, _mask in events:
                conn = key.data
                done = _advance(conn, message, selector, fail, open_socks)
                if done:
                    pending -= 1
                    answers.append(time.perf_counter() - conn.started)
    open_s = time.perf_counter() - started
    if hold is not None:
        hold_started = time.perf_counter()
        hold(len(open_socks))
        started += time.perf_counter() - hold_started
    for sock in open_socks:
        sock.close()
    total_s = time.perf_counter() - started
    selector.close()
    answers.sort()
    answer_s = {"p50": answers[len(answers) // 2], "p99": answers[int(len(answers) * 0.99)],
                "max": answers[-1], "over_1s": sum(1 for value in answers if value > 1.0)
                } if answers else {}
    return {"ok": len(open_socks), "failures": count - len(open_socks), "errors": errors,
            "open_s": open_s, "total_s": total_s, "answer_s": answer_s}


def _advance(conn, message, selector, fail, open_socks):
    """One step of a connection's life; returns 1 once it is done (answered or failed)."""
    sock = conn.sock
    try:
        if conn.state == "connecting":
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                fail(conn, errno.errorcode.get(code, str(code)))
                return 1
            sent = sock.send(message)  # 73 bytes into an empty socket buffer: all of it
            if sent != len(message):
                fail(conn, "short send")
                return 1
            conn.state = "reading"
            selector.modify(sock, selectors.EVENT_READ, conn)
            return 0
        data = sock.recv(REQUEST)
    except OSError as exc:
        fail(conn, errno.errorcode.get(exc.errno, str(exc)))
        return 1
    if not data:
        fail(conn, "closed")
        return 1
    conn.got += data
    if len(conn.got) < REQUEST:
        return 0
    if conn.got != message[HEADER.size:]:
        fail(conn, "wrong echo")
        return 1
    selector.unregister(sock)
    open_socks.append(sock)
    return 1


def hog(port, seconds):
    """Download without end for at most ``seconds``; prints "started", then the bytes read."""
    buffer = bytearray(BLOCK)
    total = 0
    with connect(port) as sock:
        sock.sendall(HEADER.pack(b"D", FOREVER))
        started = time.monotonic()
        announced = False
        while time.monotonic() - started < seconds:
            count = sock.recv_into(buffer)
            if not count:
                break
            total += count
            if not announced and total >= 8 * BLOCK:
                print("started", flush=True)
                announced = True
        elapsed = time.monotonic() - started
    print("bytes %d seconds %.3f" % (total, elapsed), flush=True)


def push(port, seconds):
    """Upload without end for at most ``seconds``; prints "started", then the bytes sent."""
    block = memoryview(bytes(range(256)) * (BLOCK // 256))
    total = 0
    with connect(port) as sock:
        sock.sendall(HEADER.pack(b"U", FOREVER))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            sock.sendall(block)
            total += len(block)
            if total == 8 * BLOCK:
                print("started", flush=True)
        elapsed = time.monotonic() - started
    print("bytes %d seconds %.3f" % (total, elapsed), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("hog", "push"):
        {"hog": hog, "push": push}[sys.argv[1]](int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit("usage: python bench/load.py hog|push PORT SECONDS")
