"""The kept round trip's Python path in one process, for profiling it call by call.

    python bench/hops.py [--count N] [--profile] [--aead cryptography|pycryptodome]

Real diglett Tunnels and Pumps, a server and an agent joined by a loopback TCP connection,
a gevent echo backend and a gevent client doing N kept 64-byte round trips, all on one hub.
The wall time is not the multi-process figure (no process wakes up here, and the client and
the backend run on the same core); what it gives is the count of Python calls, greenlet
switches and hub iterations per round trip, and with --profile which functions the round
trip spends its interpreter time in, repeatable on a noisy machine. bench/rtt.py measures
the real thing.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diglett import crypto, protocol  # noqa: E402
from diglett.tunnel import Tunnel  # noqa: E402

REQUEST = 64
WINDOW = protocol.DEFAULT_WINDOW
DEADLINE = 60  # seconds for the whole run


def _echo(sock, _address):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def _pair():
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    return a, b


def build(aead):
    """(client port, server tunnel, agent tunnel, backend) wired as the real processes are."""
    keys = (b"\x11" * 32, b"\x33" * 32)
    chaining = b"\x22" * 32

    def cipher(key):
        return crypto.TransportCipher(key, chaining, crypto.get_backend(aead))

    server_session = protocol.Session(protocol.SERVER, cipher(keys[0]), cipher(keys[1]),
                                      window=WINDOW)
    agent_session = protocol.Session(protocol.AGENT, cipher(keys[1]), cipher(keys[0]))
    for session in (server_session, agent_session):
        session.configured = True
        session.window = WINDOW
    backend = StreamServer(("127.0.0.1", 0), _echo)
    backend.start()
    agent_sock, server_sock = _pair()
    server = Tunnel(server_sock, server_session, label="server", ping_interval=30,
                    dead_after=90)

    def on_agent_event(event):
        if type(event) is protocol.StreamOpened:
            agent.add_stream(event.stream_id, connect=lambda: socket.create_connection(
                ("127.0.0.1", backend.server_port)))

    agent = Tunnel(agent_sock, agent_session, label="agent", ping_interval=30, dead_after=90,
                   on_event=on_agent_event)
    server.start()
    agent.start()
    front = socket.create_server(("127.0.0.1", 0))

    def accept():
        while True:
            client, _ = front.accept()
            stream_id = server_session.open_stream({})
            server.add_stream(stream_id, client)
            server.send_soon()

    gevent.spawn(accept)
    return front.getsockname()[1], server, agent, backend


def round_trips(port, count):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"E" + b"\0" * 8)  # bench/backend.py's header; _echo ignores it
    message = b"m" * REQUEST
    sock.sendall(message)
    got = b""
    while len(got) < 9 + REQUEST:
        got += sock.recv(65536)
    limit = time.monotonic() + DEADLINE
    for _ in range(count):
        sock.sendall(message)
        got = 0
        while got < REQUEST:
            got += len(sock.recv(65536))
        if time.monotonic() > limit:
            raise SystemExit("deadline passed")
    sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured part")
    parser.add_argument("--aead", default="auto")
    parser.add_argument("--direct", action="store_true",
                        help="the client talks to the backend: the harness's own share, to "
                        "subtract from a run through diglett")
    args = parser.parse_args(argv)
    port, server, agent, backend = build(args.aead)
    if args.direct:
        port = backend.server_port
    round_trips(port, 200)  # warm up
    switches = [0]

    def trace(event, _args):
        switches[0] += 1

    loop = gevent.get_hub().loop
    before = loop.iteration if hasattr(loop, "iteration") else 0
    profiler = cProfile.Profile() if args.profile else None
    greenlet.settrace(trace)
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    round_trips(port, args.count)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - started
    greenlet.settrace(None)
    iterations = (loop.iteration - before) if hasattr(loop, "iteration") else float("nan")
    print("%d round trips: %.1f us each in one process; per round trip %.2f greenlet switches, "
          "%.2f hub iterations" % (args.count, 1e6 * elapsed / args.count,
                                   switches[0] / args.count, iterations / args.count))
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(30)
    backend.stop()


if __name__ == "__main__":
    main()
