"""Real processes on loopback for end-to-end tests: a gateway, its agents, and backends.

Everything binds 127.0.0.1 on port 0 and learns its ports from the processes' own output.
Every wait has a deadline, and every process started here is ended by its PID.
"""

import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
READY = re.compile(r"ready: agents=(\S+):(\d+) http=(\S+):(\d+) domain=\S+ key=([0-9a-f]{66})")
TUNNEL_UP = re.compile(r"tunnel up: (\S+) -> \S+ \(server port (\d+)\)")
TEST_SERVER_OPTIONS = {  # shrunk timers so failures show in seconds
    "ping_interval": "1",
    "dead_after": "3",
    "handshake_timeout": "3",
    "penalty_max": "0",
    "shutdown_timeout": "3",
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

    def __init__(self, argv, workdir, label, env=None):
        self.label = label
        self.out_path = Path(workdir) / ("%s.out" % label)
        self.err_path = Path(workdir) / ("%s.err" % label)
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err,
                                      stdin=subprocess.DEVNULL, cwd=workdir, env=full_env)
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

    def __init__(self, workdir, domain="example.test", **options):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.domain = domain
        self.config_path = self.workdir / "server.conf"
        settings = {"listen": "127.0.0.1:0", "http": "127.0.0.1:0", "domain": domain,
                    "key": "server.key", "database": "registry.db", **TEST_SERVER_OPTIONS}
        settings.update({k: str(v) for k, v in options.items()})
        self.config_path.write_text(
            "[server]\n" + "".join("%s = %s\n" % item for item in settings.items()))
        self.proc = None
        self.agents = []

    def start(self, timeout=15):
        self.proc = Proc(command("diglett-server") + ["-c", str(self.config_path)],
                         self.workdir, "server")
        match = self.proc.wait_for(READY, timeout)
        self.agent_address = (match.group(1), int(match.group(2)))
        self.http_address = (match.group(3), int(match.group(4)))
        self.key = match.group(5)
        return self

    @property
    def gateway(self):
        return "%s:%d" % self.agent_address

    def restart(self):
        """Start again on the same ports (the config is rewritten to pin them)."""
        text = self.config_path.read_text()
        text = re.sub(r"listen = .*", "listen = %s:%d" % self.agent_address, text)
        text = re.sub(r"http = .*", "http = %s:%d" % self.http_address, text)
        self.config_path.write_text(text)
        old = self.proc
        old.close()
        self.proc = Proc(command("diglett-server") + ["-c", str(self.config_path)],
                         self.workdir, "server-%d" % len(Proc.registry))
        self.proc.wait_for(READY, 15)
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
    """A threaded TCP server on 127.0.0.1:0 running ``handler(sock)`` per connection."""

    def __init__(self, handler):
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

        self.server = Server(("127.0.0.1", 0), Handler)
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
