"""The data path end to end: a real server, a real agent and backends on loopback.

Bytes must cross intact both ways (digests compared at both ends), half-closes must pass
through (also both at once with data queued both ways), real clients (curl, ssh) must work, a
stalled stream must not slow its neighbours or grow memory without bound, an abort (a backend
killed mid-download) must never look like a clean EOF, and keys rotate under load. See test
plan E1-E4, E6 and D3 (docs/testplan.md). Every test has a deadline sized to its work.

Why ~590 lines: one subject, the data path; each test builds its own backend and checks its own
digests.
"""

import concurrent.futures
import functools
import getpass
import hashlib
import http.server
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from diglett import config, protocol
from tests.support import harness
from tests.support.harness import (
    Backend,
    by_first_byte,
    connect,
    digest_then_seeded,
    echo,
    flood,
    free_port,
    greeter,
    recv_exact,
    recv_sha256,
    round_trips,
    seeded_chunks,
    seeded_sha256,
    send_seeded,
    stall,
    vm_rss,
    wait_until,
)
from tests.support.peers import login
from tests.support.sshd import start_sshd

KiB = 1 << 10
MiB = 1 << 20
_WINDOW = config.SERVER.keys["stream_window"]
W0 = _WINDOW.parse(_WINDOW.default)  # the stream window the gateway fixture's server uses
EDGE_SIZES = (0, 1, 65527, 65528, W0, W0 + 1)  # empty, one byte, around a full frame and W0
STREAMS = 200
TOTAL_LIMIT = 300 * MiB  # both directions of all concurrent streams together
LATENCY_BOUND = 0.2  # seconds: isolation, not speed; a stalled neighbour would take far longer
RSS_GROWTH_LIMIT = 64 * MiB  # what a stalled stream may add to a process's memory
STALL_LIMIT = 64 * MiB  # bytes a stalled peer may push before backpressure stops it


@pytest.fixture
def backends():
    """Backends a test starts, closed when it ends."""
    started = []

    def start(handler, port=0):
        backend = Backend(handler, port=port)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


def upload_then_download(port, up_size, down_size, up_seed, down_seed, timeout=60):
    """Upload, half-close, then read the backend's digest and its seeded reply; check both."""
    with connect(port, timeout=timeout) as sock:
        send_seeded(sock, up_size, up_seed)
        sock.shutdown(socket.SHUT_WR)
        assert recv_exact(sock, 32).hex() == seeded_sha256(up_size, up_seed), \
            "the backend received different bytes than the client sent"
        assert recv_sha256(sock, down_size) == seeded_sha256(down_size, down_seed), \
            "the client received different bytes than the backend sent"
        assert sock.recv(1) == b"", "bytes after the end of the reply"


# ----- bytes intact (E1) ----------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_one_mib_each_way(gateway, backends):
    backend = backends(digest_then_seeded(MiB, b"down-1m"))
    agent = gateway.agent("data", backend.address)
    upload_then_download(agent.port, MiB, MiB, b"up-1m", b"down-1m")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_256_mib_each_way(gateway, backends):
    size = 256 * MiB
    backend = backends(digest_then_seeded(size, b"down-256m"))
    agent = gateway.agent("data", backend.address)
    upload_then_download(agent.port, size, size, b"up-256m", b"down-256m")


def stream_sizes(rng):
    """(upload, download) sizes: every pair of EDGE_SIZES, then random sizes up to 2 MiB."""
    sizes = [(up, down) for up in EDGE_SIZES for down in EDGE_SIZES]
    while len(sizes) < STREAMS:
        sizes.append(tuple(rng.choice((rng.randint(0, 64 * KiB), rng.randint(0, 512 * KiB),
                                       rng.randint(0, 2 * MiB))) for _ in range(2)))
    return sizes


def write_sizes(rng):
    """Seed-derived write sizes, from a few bytes to more than a window."""
    while True:
        yield rng.choice((rng.randint(1, 2 * KiB), rng.randint(1, 64 * KiB),
                          rng.randint(1, 300 * KiB)))


HEADER = struct.Struct("!IQQ")  # stream index, upload size, download size


def seeded_exchange(verdicts):
    """Backend of the concurrent test: the header names the stream; then it sends that stream's
    own download while reading its upload, checks the upload and appends its digest."""
    def handler(sock):
        index, up_size, down_size = HEADER.unpack(recv_exact(sock, HEADER.size))
        failures = []

        def download():
            try:
                send_seeded(sock, down_size, b"down-%d" % index, write_sizes(random.Random(index)))
            except OSError as exc:
                failures.append(exc)

        sender = threading.Thread(target=download, daemon=True)
        sender.start()
        digest, count = hashlib.sha256(), 0
        while data := sock.recv(262144):
            digest.update(data)
            count += len(data)
        sender.join()
        verdicts[index] = (count == up_size and digest.hexdigest()
                           == seeded_sha256(up_size, b"up-%d" % index) and not failures)
        sock.sendall(digest.digest())
        sock.shutdown(socket.SHUT_WR)
    return handler


def concurrent_client(port, index, up_size, down_size):
    """One stream of the concurrent test; returns a list of what went wrong (empty: fine)."""
    problems = []
    with connect(port, timeout=60) as sock:
        def upload():
            try:
                sock.sendall(HEADER.pack(index, up_size, down_size))
                send_seeded(sock, up_size, b"up-%d" % index, write_sizes(random.Random(-index)))
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                problems.append("upload: %r" % exc)

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        try:
            if recv_sha256(sock, down_size) != seeded_sha256(down_size, b"down-%d" % index):
                problems.append("download digest differs")
            if recv_exact(sock, 32).hex() != seeded_sha256(up_size, b"up-%d" % index):
                problems.append("upload digest differs")
            if sock.recv(1) != b"":
                problems.append("bytes after the end")
        except (OSError, AssertionError) as exc:
            problems.append("download: %r" % exc)
        sender.join(60)
    return problems


@pytest.mark.timeout(90)
def test_200_concurrent_streams_both_ways(gateway, backends):
    sizes = stream_sizes(random.Random(20240601))
    assert sum(map(sum, sizes)) < TOTAL_LIMIT
    verdicts = {}
    backend = backends(seeded_exchange(verdicts))
    agent = gateway.agent("data", backend.address)
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(lambda args: concurrent_client(agent.port, *args),
                                [(index, *pair) for index, pair in enumerate(sizes)]))
    failed = {index: (sizes[index], problems) for index, problems in enumerate(results)
              if problems}
    assert not failed, "%d of %d streams failed, e.g. %r" % (
        len(failed), STREAMS, list(failed.items())[:5])
    wrong_uploads = sorted(index for index in range(STREAMS) if verdicts.get(index) is not True)
    assert not wrong_uploads, "the backend saw wrong uploads on streams %r" % wrong_uploads


# ----- half-close (E2) --------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_client_half_close_still_gets_the_whole_reply(gateway, backends):
    backend = backends(digest_then_seeded(5 * MiB, b"reply-5m"))
    agent = gateway.agent("data", backend.address)
    upload_then_download(agent.port, 5 * MiB, 5 * MiB, b"upload-5m", b"reply-5m")


@pytest.mark.timeout(30)
def test_backend_half_closes_first_and_still_reads(gateway, backends):
    banner = b"banner: this side is done talking\r\n"
    digests = []
    done = threading.Event()

    def handler(sock):
        sock.sendall(banner)
        sock.shutdown(socket.SHUT_WR)
        digest, count = hashlib.sha256(), 0
        while data := sock.recv(262144):
            digest.update(data)
            count += len(data)
        digests.append((digest.hexdigest(), count))
        done.set()

    backend = backends(handler)
    agent = gateway.agent("data", backend.address)
    with connect(agent.port) as sock:
        assert recv_exact(sock, len(banner)) == banner
        assert sock.recv(1) == b"", "the backend's half-close did not reach the client"
        send_seeded(sock, 3 * MiB, b"after-banner")  # the other direction still flows
        sock.shutdown(socket.SHUT_WR)
        assert done.wait(10), "the backend never saw the client's EOF"
    assert digests == [(seeded_sha256(3 * MiB, b"after-banner"), 3 * MiB)]


# ----- real clients, and servers that speak first (E6) -----------------------------------------
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.timeout(30)
def test_curl_through_the_tunnel(gateway, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    body = b"".join(seeded_chunks(3 * MiB + 17, b"page"))
    (site / "page.bin").write_bytes(body)
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        agent = gateway.agent("web", httpd.server_address)
        out = tmp_path / "fetched.bin"
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-o", str(out), "-w", "%{http_code}",
             "http://127.0.0.1:%d/page.bin" % agent.port],
            capture_output=True, text=True, timeout=25)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(body).hexdigest()


@pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"),
                    reason="needs openssh-server and ssh")
@pytest.mark.timeout(40)
def test_ssh_through_the_tunnel(gateway, tmp_path):
    sshd_port, client_key = start_sshd(tmp_path / "ssh")
    agent = gateway.agent("shell", ("127.0.0.1", sshd_port))
    result = subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(agent.port), "-i", str(client_key),
         "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
         "-o", "ConnectTimeout=10", "%s@127.0.0.1" % getpass.getuser(),
         "echo", "hello-through-diglett"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello-through-diglett\n"


@pytest.mark.timeout(20)
def test_greeter_speaks_first(gateway, backends):
    banner = b"220 greeter.test ESMTP ready\r\n"
    backend = backends(greeter(banner))
    agent = gateway.agent("mail", backend.address)
    with connect(agent.port, timeout=5) as sock:
        assert recv_exact(sock, len(banner)) == banner  # nothing was sent first
        sock.sendall(b"QUIT\r\n")
        assert recv_exact(sock, 6) == b"QUIT\r\n"


# ----- flow control: a stalled stream does not slow its neighbours (§4.3) ----------------------
def settled(read, what, quiet=0.5, timeout=15):
    """Wait until ``read()`` stops changing for ``quiet`` seconds; returns the value."""
    last = [read(), time.monotonic()]

    def still():
        value = read()
        if value != last[0]:
            last[:] = [value, time.monotonic()]
        return time.monotonic() - last[1] >= quiet

    wait_until(still, timeout, interval=0.05, what=what)
    return last[0]


def assert_fast_echo(port):
    with connect(port, timeout=5) as sock:
        sock.sendall(b"E")
        round_trips(sock, 5)  # warm up
        times = sorted(round_trips(sock, 50))
    p99 = times[int(0.99 * len(times))]
    assert p99 < LATENCY_BOUND, "echo p99 %.1f ms next to a stalled stream (max %.1f ms)" % (
        p99 * 1e3, times[-1] * 1e3)


@pytest.mark.timeout(40)
def test_client_that_stops_reading_does_not_slow_another(gateway, backends):
    counter = {}
    backend = backends(by_first_byte({b"F": flood(counter), b"E": echo}))
    agent = gateway.agent("data", backend.address)
    before = {proc.label: vm_rss(proc.pid) for proc in (gateway.proc, agent)}
    with connect(agent.port) as stalled:
        stalled.sendall(b"F")  # and never reads
        wait_until(lambda: counter.get("sent", 0) > MiB, 10, what="the flood to start")
        assert_fast_echo(agent.port)
        sent = settled(lambda: counter.get("sent", 0), "backpressure to stop the flood")
        assert sent < STALL_LIMIT, "the backend pushed %d MiB into a stalled stream" % (sent >> 20)
        assert_fast_echo(agent.port)  # and once the stall is complete
        for proc in (gateway.proc, agent):
            growth = vm_rss(proc.pid) - before[proc.label]
            assert growth < RSS_GROWTH_LIMIT, "%s grew by %d MiB" % (proc.label, growth >> 20)


@pytest.mark.timeout(40)
def test_backend_that_stops_reading_does_not_slow_another(gateway, backends):
    release = threading.Event()
    backend = backends(by_first_byte({b"S": stall(release), b"E": echo}))
    agent = gateway.agent("data", backend.address)
    before = {proc.label: vm_rss(proc.pid) for proc in (gateway.proc, agent)}
    uploaded = [0]
    stop = threading.Event()
    stalled = connect(agent.port, timeout=0.2)

    def upload():
        block = bytes(64 * KiB)
        stalled.sendall(b"S")
        while not stop.is_set():
            try:
                uploaded[0] += stalled.send(block)
            except socket.timeout:
                continue
            except OSError:
                return

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        wait_until(lambda: uploaded[0] > MiB, 10, what="the upload to start")
        assert_fast_echo(agent.port)
        sent = settled(lambda: uploaded[0], "backpressure to stop the upload")
        assert sent < STALL_LIMIT, "the client pushed %d MiB into a stalled backend" % (sent >> 20)
        assert_fast_echo(agent.port)
        for proc in (gateway.proc, agent):
            growth = vm_rss(proc.pid) - before[proc.label]
            assert growth < RSS_GROWTH_LIMIT, "%s grew by %d MiB" % (proc.label, growth >> 20)
    finally:
        stop.set()
        release.set()
        uploader.join(5)
        stalled.close()


# ----- backend failures reset one stream only (D3) ----------------------------------------------
def closed_or_reset(sock):
    """True if the peer closed or reset the connection (False on more data)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def hold_port(port):
    """Bind ``port`` without listening: connections are refused, and no other process (another
    test run, an outgoing connection) can take the port meanwhile."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def echo_once(sock, message, what, logs):
    try:
        sock.sendall(message)
        assert recv_exact(sock, len(message)) == message
    except (OSError, AssertionError) as exc:
        raise AssertionError("%s: %r%s" % (what, exc, logs())) from None


@pytest.mark.timeout(30)
def test_refused_backend_resets_only_that_stream(gateway, backends):
    port = free_port()
    backend = backends(echo, port=port)
    agent = gateway.agent("data", ("127.0.0.1", port))

    def logs():
        return "\n--- agent ---\n%s\n--- server ---\n%s" % (agent.stderr()[-3000:],
                                                            gateway.proc.stderr()[-3000:])

    with connect(agent.port) as survivor:
        echo_once(survivor, b"before", "the first stream", logs)
        backend.close()  # the port refuses now; the established stream lives on
        with hold_port(port), connect(agent.port, timeout=5) as refused:
            started = time.monotonic()
            assert closed_or_reset(refused), "a refused backend sent bytes" + logs()
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, "the refused stream took %.1f s to end%s" % (elapsed, logs())
        echo_once(survivor, b"after", "the first stream after the refusal", logs)
    assert "CONNECT_FAILED" in agent.stderr()
    backends(echo, port=port)  # the backend is back: new streams work again
    with connect(agent.port, timeout=5) as again:
        echo_once(again, b"again", "a stream after the backend came back", logs)


@pytest.mark.timeout(20)
def test_backend_reset_after_10_kib_reaches_the_client_as_a_reset(gateway, backends):
    body = b"".join(seeded_chunks(10 * KiB, b"then-reset"))

    def handler(sock):
        sock.sendall(body)
        # Linux throws away received bytes the agent has not read yet when the RST lands
        # first; on loopback that race is microseconds wide, so give the bytes a head start.
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    backend = backends(handler)
    agent = gateway.agent("data", backend.address)
    with connect(agent.port, timeout=5) as sock:
        assert recv_exact(sock, len(body)) == body
        with pytest.raises(ConnectionResetError):
            extra = sock.recv(1)
            pytest.fail("a reset backend looked like %r" % (extra or "a clean EOF"))


# ----- an abort is never a clean EOF (E3) --------------------------------------------------------
@pytest.mark.timeout(30)
def test_agent_killed_mid_download_is_not_a_clean_eof(gateway, backends):
    backend = backends(flood({}))
    agent = gateway.agent("data", backend.address)
    with connect(agent.port, timeout=10) as sock:
        recv_exact(sock, 4 * MiB)
        agent.kill()  # SIGKILL
        received = 0
        with pytest.raises(ConnectionResetError):
            while data := sock.recv(262144):
                received += len(data)
            pytest.fail("clean EOF after %d more bytes: a truncated download looked complete"
                        % received)




# ----- E2 (c): both sides half-close at once, data queued both ways ---------------------------
@pytest.mark.timeout(40)
def test_simultaneous_half_close_with_data_queued_both_ways(gateway):
    size = 4 * MiB
    start = threading.Barrier(2, timeout=10)
    backend_result = {}

    def handler(sock):
        sender = threading.Thread(target=lambda: (start.wait(), send_seeded(sock, size, b"down"),
                                                  sock.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        backend_result["digest"] = recv_sha256(sock, size)
        backend_result["eof"] = sock.recv(1) == b""
        sender.join(20)

    backend = Backend(handler)
    try:
        agent = gateway.agent("both", backend.address)
        with connect(agent.port, timeout=20) as sock:
            uploader = threading.Thread(target=lambda: (start.wait(), send_seeded(sock, size,
                                                                                    b"up"),
                                                        sock.shutdown(socket.SHUT_WR)),
                                        daemon=True)
            uploader.start()
            assert recv_sha256(sock, size) == seeded_sha256(size, b"down")
            assert sock.recv(1) == b"", "FIN did not follow the data"
            uploader.join(20)
        wait_until(lambda: "eof" in backend_result, 10, what="the backend's end")
        assert backend_result == {"digest": seeded_sha256(size, b"up"), "eof": True}
        wait_until(lambda: gateway.http_get("/debug/stats")["streams"] == 0, 5,
                   what="the stream to be closed on the server")
    finally:
        backend.close()


# ----- E3: an abort is never a clean EOF ------------------------------------------------------
BACKEND_PROCESS = r"""
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
sock, _ = listener.accept()
block = bytes(range(256)) * 256
while True:
    sock.sendall(block)
"""


@pytest.mark.timeout(30)
def test_backend_process_killed_mid_download_is_not_a_clean_eof(gateway, tmp_path):
    backend = harness.Proc([sys.executable, "-c", BACKEND_PROCESS], tmp_path, "backend")
    port = int(backend.wait_for(r"^(\d+)$", timeout=10, stream="stdout").group(1))
    agent = gateway.agent("dl", ("127.0.0.1", port))
    with connect(agent.port, timeout=10) as sock:
        # Bytes the backend never reads: a killed process with unread bytes resets its
        # connections. (With nothing unread the kernel closes with a plain FIN, which no
        # proxy can tell from a complete reply.)
        sock.sendall(b"unread" * 100)
        harness.recv_exact(sock, 2 * MiB)
        backend.kill()
        received = 0
        with pytest.raises(OSError):
            while data := sock.recv(262144):
                received += len(data)
            pytest.fail("clean EOF %d bytes after the backend was killed" % received)
    assert agent.popen.poll() is None


# ----- E5: key rotation under load ------------------------------------------------------------
@pytest.mark.timeout(90)
def test_key_rotation_under_load_many_records_each_way(gateway, echo_backend):
    """50 streams of small writes through the real server to a hand-made agent that echoes:
    both directions cross many 1000-nonce key rotations, every stream's bytes come back intact,
    and the rotation counts match the sans-IO model (records * 2 // 1000)."""
    streams, writes, size = 50, 1400, 40  # 50 x 1400 writes of 40 bytes, each way
    key_file, public = gateway.new_key("rot")
    gateway.grant("rot", public)
    peer, answer = login(gateway, key_file, "rot")
    assert isinstance(answer, protocol.Accepted)
    port = answer.info["port"]
    session = peer.session
    clients = [connect(port, timeout=20) for _ in range(streams)]
    payloads = [hashlib.sha256(b"%d" % n).digest()[:size // 4] * 4 for n in range(streams)]
    got = {n: hashlib.sha256() for n in range(streams)}
    by_stream = {}

    def client_writer(number):
        for _ in range(writes):
            clients[number].sendall(payloads[number])
            time.sleep(0.001)  # Nagle is off: most writes become their own record

    def client_reader(number):
        total = writes * size
        got[number] = recv_sha256(clients[number], total)

    threads = [threading.Thread(target=f, args=(n,), daemon=True)
               for n in range(streams) for f in (client_writer, client_reader)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    total = streams * writes * size
    echoed = 0
    while echoed < total and time.monotonic() < deadline:
        peer.poll(0.2)
        for event in peer.events:
            if isinstance(event, protocol.StreamOpened):
                by_stream[event.stream_id] = event
            elif isinstance(event, protocol.DataReceived):
                # echo in small frames, one record each: many records server-bound too
                session.send_data(event.stream_id, bytes(event.data))
                echoed += len(event.data)
                peer.flush()
            elif isinstance(event, protocol.GoAwayReceived):
                pytest.fail("the server ended the session: %r" % (event,))
        peer.events.clear()
    for thread in threads:
        thread.join(20)
    expected = {n: hashlib.sha256(payloads[n] * writes).hexdigest() for n in range(streams)}
    assert got == expected, "bytes differ after crossing the key rotations"
    records_in, records_out = session.records_in, session.records_out
    rotations_in, rotations_out = peer.handshake.recv_cipher.rotations, \
        peer.handshake.send_cipher.rotations
    print("records server->agent %d (rotations %d), agent->server %d (rotations %d)"
          % (records_in, rotations_in, records_out, rotations_out))
    assert rotations_in == records_in * 2 // 1000 and rotations_out == records_out * 2 // 1000
    assert records_in >= 10000 and records_out >= 10000, (records_in, records_out)
    assert gateway.http_get("/debug/stats")["agents"] == 1
    for sock in clients:
        sock.close()
    peer.close()


ROUND_TRIPS = 400
FAULTS_PER_ROUND_TRIP = 0.5  # minor page faults a process may take per kept round trip


def _minor_faults(pid):
    with open("/proc/%d/stat" % pid) as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.timeout(60)
def test_kept_round_trips_take_no_page_faults(gateway):
    """A small read must not map pages: before issue 14 an agent took ~4 faults per round trip
    (recv(256 KiB) mapped, remapped and unmapped its buffer), ~20 us each here."""
    backend = Backend(echo)
    try:
        agent = gateway.agent("rtt", backend.address)
        with connect(agent.port, timeout=10) as sock:
            round_trips(sock, 100)  # warm up: pools and caches fill once
            pids = (gateway.proc.pid, agent.pid)
            before = [_minor_faults(pid) for pid in pids]
            started = time.monotonic()
            round_trips(sock, ROUND_TRIPS)
            elapsed = time.monotonic() - started
            faults = [_minor_faults(pid) - b for pid, b in zip(pids, before)]
        for name, count in zip(("server", "agent"), faults):
            assert count <= FAULTS_PER_ROUND_TRIP * ROUND_TRIPS, (
                "%s took %d page faults in %d round trips (%.1f s)"
                % (name, count, ROUND_TRIPS, elapsed))
    finally:
        backend.close()
