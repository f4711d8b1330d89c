"""Real processes on loopback for end-to-end tests: a gateway, its agents, and backends.

Everything binds 127.0.0.1 on port 0 and learns its ports from the processes' own output.
Every wait has a deadline, and every process started here is ended by its PID.

Why one module of ~600 lines: it is the one place that starts, watches and ends real processes
(Proc and its registry, Gateway, Agent, Backend, Relay); the test files depend on their shared
plumbing, and a split would make each import four modules.
"""

import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from diglett import readyfile  # noqa: E402

BIN = Path(sys.executable).parent
# The ready log line, for the few tests that start the server their own way (prlimit, systemd);
# Gateway reads the ready file (docs/operations.md "Scripts and the ready file").
READY = re.compile(r"ready: agents=(\S+):(\d+) http=(\S+):(\d+) domain=\S+ key=([0-9a-f]{66})")
TUNNEL_UP = re.compile(r"tunnel up: (\S+) -> \S+ \(server port (\d+)\)")
TEST_SERVER_OPTIONS = {  # shrunk timers so failures show in seconds
    "ping_interval": "1",
    "dead_after": "3",
    "handshake_timeout": "3",
    "penalty_max": "0",
    "shutdown_timeout": "3",
    "drain_timeout": "3",
    "hold_timeout": "0",  # a port closes with its session; the hold's own tests set it
    "workers": "1",  # the tests of one process; tests/e2e/test_workers*.py run several
}


def command(name):
    """A console script of this venv (what a user runs), else the module behind it."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"diglett": "agent", "diglett-server": "server", "diglett-admin": "admin"}[name]
    return [sys.executable, "-m", "diglett.cli." + module]


def wait_until(predicate, timeout, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


class Proc:
    """A child process with stdout and stderr in files, so nothing blocks on a full pipe."""

    registry = []  # every Proc started, for the cleanup fixture

    def __init__(self, argv, workdir, label, env=None, supervisor=None):
        """``supervisor``: a tests.fdstore_supervisor.FdStoreSupervisor to run it under."""
        self.label = label
        self.out_path = Path(workdir) / ("%s.out" % label)
        self.err_path = Path(workdir) / ("%s.err" % label)
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        extra = {}
        if supervisor is not None:
            argv, full_env, extra = supervisor.popen(argv, full_env)
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err,
                                      stdin=subprocess.DEVNULL, cwd=workdir, env=full_env,
                                      **extra)
        Proc.registry.append(self)

    @property
    def pid(self):
        return self.popen.pid

    def stdout(self):
        return self.out_path.read_text(errors="replace")

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def wait_for(self, pattern, timeout=10, stream="stderr"):
        """The first match of ``pattern`` in the output; fails early if the process exits."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def found():
            match = regex.search(getattr(self, stream)())
            if match is None and self.popen.poll() is not None:
                raise AssertionError("%s exited with %s before printing %r:\n%s\n%s" % (
                    self.label, self.popen.returncode, regex.pattern, self.stdout(),
                    self.stderr()[-4000:]))
            return match

        try:
            return wait_until(found, timeout, what="%s to print %r" % (self.label, regex.pattern))
        except AssertionError as exc:
            raise AssertionError("%s\n--- %s stderr ---\n%s" % (exc, self.label,
                                                               self.stderr()[-4000:])) from None

    def wait(self, timeout=10):
        return self.popen.wait(timeout)

    def signal(self, signum):
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.returncode

    def close(self):
        if self.popen.poll() is None:
            self.kill()
        self._out.close()
        self._err.close()


class Gateway:
    """A diglett server with its own config, key and SQLite registry in ``workdir``."""

    def __init__(self, workdir, domain="example.test", sections=None, supervisor=None,
                 **options):
        """``options`` are [server] keys; ``sections`` ({name: {key: value}}) are appended as
        more sections, e.g. {"hooks": {"enabled": "script"}, "hook:script": {...}};
        ``supervisor`` runs the server as systemd would (tests.fdstore_supervisor)."""
        self.supervisor = supervisor
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.domain = domain
        self.config_path = self.workdir / "server.conf"
        settings = {"listen": "127.0.0.1:0", "http": "127.0.0.1:0", "domain": domain,
                    "key": "server.key", "database": "registry.db", **TEST_SERVER_OPTIONS}
        settings.update({k: str(v) for k, v in options.items()})
        text = "[server]\n" + "".join("%s = %s\n" % item for item in settings.items())
        for name, keys in (sections or {}).items():
            text += "\n[%s]\n" % name + "".join("%s = %s\n" % (k, v) for k, v in keys.items())
        self.config_path.write_text(text)
        self.proc = None
        self.agents = []

    def start(self, timeout=15):
        self.proc = self._server("server")
        self._read_ready(timeout)
        return self

    def _server(self, label):
        self.ready_path = self.workdir / "server.ready"
        readyfile.remove(self.ready_path)  # a killed run's file must not pass for the next's
        return Proc(command("diglett-server") + ["-c", str(self.config_path), "--ready-file",
                                                 str(self.ready_path)],
                    self.workdir, label, supervisor=self.supervisor)

    def _read_ready(self, timeout):
        try:
            ready = readyfile.wait(self.ready_path, timeout, self.proc.popen.poll)
        except readyfile.NotReady as exc:
            raise AssertionError("%s\n--- server stderr ---\n%s" % (
                exc, self.proc.stderr()[-4000:])) from None
        self.agent_address = (ready["agents"]["host"], ready["agents"]["port"])
        self.http_address = (ready["http"]["host"], ready["http"]["port"])
        self.key = ready["key"]  # a deleted key file means a new key

    @property
    def gateway(self):
        return "%s:%d" % self.agent_address

    def restart(self, graceful=False):
        """Start again on the same ports (the config is rewritten to pin them); the old
        process is killed (a crash), or with ``graceful`` stopped by SIGTERM."""
        text = self.config_path.read_text()
        text = re.sub(r"^listen = .*", "listen = %s:%d" % self.agent_address, text, flags=re.M)
        text = re.sub(r"^http = .*", "http = %s:%d" % self.http_address, text, flags=re.M)
        self.config_path.write_text(text)
        old = self.proc
        if graceful:
            old.stop(30)
        old.close()
        self.proc = self._server("server-%d" % len(Proc.registry))
        self._read_ready(15)
        return self

    def http_get(self, path, timeout=5):
        url = "http://%s:%d%s" % (self.http_address + (path,))
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.loads(answer.read())

    def admin(self, *args, check=True, timeout=30):
        result = subprocess.run(command("diglett-admin") + ["-c", str(self.config_path), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError("diglett-admin %s failed (%d): %s" % (
                " ".join(args), result.returncode, result.stderr))
        return result

    def new_key(self, label):
        """A fresh agent key file; returns (path, public key hex)."""
        path = self.workdir / ("%s.key" % label)
        result = subprocess.run(command("diglett") + ["keygen", "--key-file", str(path)],
                                capture_output=True, text=True, timeout=30, check=True)
        return path, result.stdout.strip()

    def grant(self, name, key, *extra):
        self.admin("grant", name, "--key", key, *extra)

    def sessions(self):
        return json.loads(self.admin("sessions", "--json").stdout)

    def agent(self, name, backend, key_file=None, server_key=None, extra=(), wait=True,
              label=None):
        """Start an agent for ``name`` -> ``backend`` ((host, port) or text)."""
        if key_file is None:
            key_file, public = self.new_key(label or name)
            self.grant(name, public)
        if not isinstance(backend, str):
            backend = "%s:%d" % backend
        argv = command("diglett") + [
            "-g", self.gateway, "-n", name, "--key-file", str(key_file),
            "--server-key", server_key or self.key, *extra, backend]
        agent = Agent(argv, self.workdir, label or "agent-%s-%d" % (name, len(Proc.registry)))
        self.agents.append(agent)
        if wait:
            agent.wait_up()
        return agent


class Agent(Proc):
    port = None
    host = None

    def wait_up(self, timeout=15, count=1):
        """Wait for the ``count``-th "tunnel up" line; returns the tunnel port."""
        def up():
            lines = TUNNEL_UP.findall(self.stdout())
            if len(lines) < count and self.popen.poll() is not None:
                raise AssertionError("agent exited with %s:\n%s" % (self.popen.returncode,
                                                                     self.stderr()[-4000:]))
            return lines[count - 1] if len(lines) >= count else None

        self.host, port = wait_until(up, timeout, what="tunnel up #%d" % count)
        self.port = int(port)
        return self.port


# ----- backends (threads in the test process) -----------------------------------------------
class Backend:
    """A threaded TCP server on 127.0.0.1:``port`` (0: any) running ``handler(sock)`` per
    connection."""

    def __init__(self, handler, port=0):
        self.accepted = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer.accepted += 1
                try:
                    handler(self.request)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 1024

        self.server = Server(("127.0.0.1", port), Handler)
        self.address = self.server.server_address
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def echo(sock):
    while True:
        data = sock.recv(65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(data)


def digest_then_reply(reply_size):
    """Read to EOF, answer the SHA-256 of what came (32 bytes) and ``reply_size`` seeded bytes."""
    def handler(sock):
        digest = hashlib.sha256()
        while True:
            data = sock.recv(262144)
            if not data:
                break
            digest.update(data)
        sock.sendall(digest.digest())
        send_pattern(sock, reply_size, b"reply")
        sock.shutdown(socket.SHUT_WR)
    return handler


def pattern(size, seed):
    """Deterministic bytes, different per seed, cheap to make in bulk."""
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def send_pattern(sock, size, seed, chunk=1 << 20):
    block = pattern(min(size, chunk), seed)
    left = size
    while left:
        part = block[:min(left, len(block))]
        sock.sendall(part)
        left -= len(part)


def sha256_of_pattern(size, seed, chunk=1 << 20):
    digest = hashlib.sha256()
    block = pattern(min(size, chunk), seed)
    left = size
    while left:
        part = block[:min(left, len(block))]
        digest.update(part)
        left -= len(part)
    return digest.hexdigest()


def recv_all(sock, limit=None):
    """Read to EOF; returns (sha256 hex, byte count). Raises on a reset, never hides one."""
    digest = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(262144)
        if not data:
            return digest.hexdigest(), total
        digest.update(data)
        total += len(data)
        if limit is not None and total >= limit:
            return digest.hexdigest(), total


def connect(port, timeout=10):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# ----- a fault relay between an agent and a server --------------------------------------------
class Relay:
    """A TCP relay on 127.0.0.1:0 forwarding to ``target``, in threads of the test process.

    It records the first ``record`` bytes of each direction of the first connection
    (``upstream``: client -> target, ``downstream``: target -> client), and with ``flip_at``
    flips the lowest bit of that byte offset of the first connection's client -> target bytes
    (target -> client with ``flip_downstream``).
    """

    def __init__(self, target, record=4096, flip_at=None, flip_downstream=False):
        self.target = tuple(target)
        self.record = record
        self.flip_at = flip_at
        self.flip_downstream = flip_downstream
        self.flipped = threading.Event()
        self.upstream = bytearray()
        self.downstream = bytearray()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self._sockets = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def gateway(self):
        return "%s:%d" % self.address

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            flip_at = self.flip_at if first else None
            threading.Thread(target=self._pump, daemon=True,
                             args=(client, server, self.upstream if first else None,
                                   None if self.flip_downstream else flip_at)).start()
            threading.Thread(target=self._pump, daemon=True,
                             args=(server, client, self.downstream if first else None,
                                   flip_at if self.flip_downstream else None)).start()

    def _pump(self, source, sink, recording, flip_at):
        offset = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if recording is not None and len(recording) < self.record:
                    recording += data[:self.record - len(recording)]
                if flip_at is not None and offset <= flip_at < offset + len(data):
                    data = bytearray(data)
                    data[flip_at - offset] ^= 1
                    data = bytes(data)
                    self.flipped.set()
                offset += len(data)
                sink.sendall(data)
        except OSError:
            for sock in (source, sink):  # end both sides; shutdown wakes the other pump
                _abort(sock)

    def close(self):
        _abort(self.listener)
        for sock in self._sockets:
            _abort(sock)


def _abort(sock):
    """Reset a socket that another thread may be blocked on (close alone would not wake it)."""
    for action in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0)),
                   lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            action()
        except OSError:
            pass


# ----- seeded streams, more backends and probes (data-path tests) ----------------------------
def seeded_chunks(size, seed, chunk=1 << 20):
    """``size`` bytes of a ChaCha20 keystream keyed by ``seed``, in pieces of at most ``chunk``.

    Unlike ``pattern`` it never repeats, so a lost, duplicated or reordered piece (or another
    stream's bytes) changes the digest.
    """
    from Crypto.Cipher import ChaCha20  # a runtime dependency of diglett

    cipher = ChaCha20.new(key=hashlib.sha256(seed).digest(), nonce=bytes(8))
    zeros = bytes(min(size, chunk))
    left = size
    while left:
        part = min(left, chunk)
        yield cipher.encrypt(zeros[:part])
        left -= part


def seeded_sha256(size, seed):
    digest = hashlib.sha256()
    for part in seeded_chunks(size, seed):
        digest.update(part)
    return digest.hexdigest()


def send_seeded(sock, size, seed, write_sizes=None):
    """Send the seeded stream; ``write_sizes`` (an iterator of ints) varies the write calls."""
    if write_sizes is None:
        for part in seeded_chunks(size, seed):
            sock.sendall(part)
        return
    data = memoryview(b"".join(seeded_chunks(size, seed)))
    offset = 0
    while offset < size:
        step = max(1, next(write_sizes))
        sock.sendall(data[offset:offset + step])
        offset += step


def recv_exact(sock, size):
    """Exactly ``size`` bytes; AssertionError on an early clean EOF."""
    chunks, left = [], size
    while left:
        data = sock.recv(min(left, 262144))
        if not data:
            raise AssertionError("clean EOF after %d of %d bytes" % (size - left, size))
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def recv_sha256(sock, size):
    """SHA-256 hex of exactly ``size`` bytes read from ``sock``."""
    digest, left = hashlib.sha256(), size
    while left:
        data = sock.recv(min(left, 262144))
        if not data:
            raise AssertionError("clean EOF after %d of %d bytes" % (size - left, size))
        digest.update(data)
        left -= len(data)
    return digest.hexdigest()


def greeter(banner):
    """Speaks first (like sshd or an SMTP server), then echoes."""
    def handler(sock):
        sock.sendall(banner)
        echo(sock)
    return handler


def flood(counter, chunk=65536):
    """Send zeros until the peer goes away, counting bytes sent in ``counter["sent"]``."""
    block = bytes(chunk)

    def handler(sock):
        while True:
            sock.sendall(block)
            counter["sent"] = counter.get("sent", 0) + chunk
    return handler


def stall(release):
    """Accept and never read or write until ``release`` (a threading.Event) is set."""
    def handler(sock):
        release.wait(120)
    return handler


def by_first_byte(handlers):
    """One backend, several behaviours: the client's first byte picks the handler."""
    def handler(sock):
        mode = sock.recv(1)
        if mode in handlers:
            handlers[mode](sock)
    return handler


def vm_rss(pid):
    """Resident memory of ``pid`` in bytes (VmRSS from /proc)."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def free_port():
    """A port that was free a moment ago (for programs that cannot report a port-0 bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_closed(port):
    """True when nothing listens on ``port`` any more (connection refused)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def round_trips(sock, count, size=64):
    """Latencies (seconds) of ``count`` echo round trips of ``size`` bytes each."""
    times = []
    for index in range(count):
        message = (b"%08d" % index) * (size // 8)
        started = time.monotonic()
        sock.sendall(message)
        if recv_exact(sock, len(message)) != message:
            raise AssertionError("echo round trip %d came back different" % index)
        times.append(time.monotonic() - started)
    return times


def digest_then_seeded(reply_size, seed):
    """Read to EOF, answer the SHA-256 of what came (32 bytes), then ``reply_size`` bytes of the
    seeded stream ``seed``, then EOF."""
    def handler(sock):
        digest = hashlib.sha256()
        while True:
            data = sock.recv(262144)
            if not data:
                break
            digest.update(data)
        sock.sendall(digest.digest())
        send_seeded(sock, reply_size, seed)
        sock.shutdown(socket.SHUT_WR)
    return handler
