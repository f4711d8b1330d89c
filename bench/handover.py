"""Does a visitor ever see a reset? Steady HTTP load through a real Traefik while the tunnel
is disturbed, counting the requests that fail (issue 13, docs/operations.md "Handover").

    python bench/handover.py                      # every scenario, 50 requests/s for 20 s
    python bench/handover.py --scenario cut --rate 50 --seconds 20 --json out.json

Scenarios, each on fresh processes (Traefik with its REST provider, diglett-server with the
Traefik hook under a stand-in for systemd's fd store, one agent through a relay, an HTTP
backend in this process):

  agent-restart   SIGTERM the agent, wait until it exits, start it again (systemctl restart)
  agent-overlap   start a second agent of the same key, the first is replaced and drains
                  (an upgrade); a slow streamed response runs across it and must arrive whole
  cut             reset the agent's TCP connection at the relay (a network blip)
  server-restart  SIGTERM the server, wait until it exits, start it again: the ports come
                  through in the fd store (systemctl restart diglett-server)

The load is one request every 1/rate s, each on a new connection (a client would otherwise
hide failures behind Traefik's pooling), from a thread each; a request fails on any status but
200, a short body or an exception. Output: one JSON object per scenario.
"""

import argparse
import hashlib
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from setups import BIN, Proc, free_port, wait_until

from diglett import readyfile
from diglett.demo import find_traefik

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.fault_relay import FaultRelay  # noqa: E402
from tests.support.fdstore_supervisor import FdStoreSupervisor  # noqa: E402

NAME = "load"
DOMAIN = "bench.test"
BODY = b"x" * 4096  # what the backend answers
STREAM_LINES = 100  # lines of the slow streamed response (one per STREAM_PAUSE)
STREAM_PAUSE = 0.05  # seconds between two of its lines
REQUEST_TIMEOUT = 15  # seconds a request may take before it counts as failed
DISTURB_AT = 1 / 3  # of the run: when the scenario's disturbance happens
SCENARIOS = ("agent-restart", "agent-overlap", "cut", "server-restart")


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for number in range(STREAM_LINES):
                line = b"line %d\n" % number
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(STREAM_PAUSE)
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a reset stream is what the bench provokes; the client side counts it


class Stand:
    """Traefik, diglett-server, the backend and the relay; agents come and go."""

    def __init__(self, folder, reuse=True):
        self.folder = Path(folder)
        self.procs = []
        self.backend = QuietServer(("127.0.0.1", 0), Backend)
        threading.Thread(target=self.backend.serve_forever, daemon=True).start()
        self.web_port, self.api_port = free_port(), free_port()
        self.procs.append(Proc([find_traefik() or sys.exit("handover: no traefik binary"),
                                "--entrypoints.web.address=127.0.0.1:%d" % self.web_port,
                                "--entrypoints.traefik.address=127.0.0.1:%d" % self.api_port,
                                "--api.insecure=true", "--providers.rest.insecure=true",
                                "--providers.providersThrottleDuration=200ms",
                                "--log.level=ERROR"], self.folder, "traefik"))
        self.config = self.folder / "server.conf"
        self.config.write_text(
            "[server]\nlisten = 127.0.0.1:0\nhttp = 127.0.0.1:0\ndomain = %s\nkey = server.key\n"
            "database = registry.db\nhold_timeout = 10\ndrain_timeout = 10\n"
            "workers = 1\n\n"  # the fd store hands tunnel ports on only from one process
            "[hooks]\nenabled = traefik\n\n"
            "[hook:traefik]\napi = http://127.0.0.1:%d\ncheck_interval = 1\n"
            "reuse_connections = %s\n" % (DOMAIN, self.api_port, "yes" if reuse else "no"))
        self.supervisor = FdStoreSupervisor(self.folder)
        self.servers = 0
        ready = self.server()
        self.server_key = ready["key"]
        self.relay = FaultRelay((ready["agents"]["host"], ready["agents"]["port"]))
        self.key_file = self.folder / "agent.key"
        public = _run([str(BIN / "diglett"), "keygen", "--key-file", str(self.key_file)])
        _run([str(BIN / "diglett-admin"), "-c", str(self.config), "grant", NAME, "--key", public])
        self.agents = 0

    def server(self):
        """Start diglett-server under the fd store; its ready file's contents."""
        self.servers += 1
        ready_file = self.folder / "server.ready"
        proc = Proc([str(BIN / "diglett-server"), "-c", str(self.config), "--ready-file",
                     str(ready_file)], self.folder, "server-%d" % self.servers,
                    supervisor=self.supervisor)
        self.procs.append(proc)
        self.server_proc = proc
        return readyfile.wait(ready_file, 20, proc.popen.poll)

    def restart_server(self):
        """SIGTERM, wait for the exit, start again; seconds from the signal to ready."""
        began = time.monotonic()
        self.server_proc.stop()
        self.server()
        return time.monotonic() - began

    def agent(self):
        self.agents += 1
        proc = Proc([str(BIN / "diglett"), "-g", self.relay.gateway, "-n", NAME,
                     "--key-file", str(self.key_file), "--server-key", self.server_key,
                     "127.0.0.1:%d" % self.backend.server_address[1]],
                    self.folder, "agent-%d" % self.agents)
        self.procs.append(proc)
        proc.wait_for(r"tunnel up: ", 20)
        return proc

    def routed(self):
        try:
            return get(self.web_port, "/")[0] == 200
        except OSError:
            return False

    def stop(self):
        for proc in reversed(self.procs):
            proc.stop()
        self.backend.shutdown()
        self.supervisor.close()


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def get(port, path, timeout=REQUEST_TIMEOUT):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": "%s.%s" % (NAME, DOMAIN)})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


class Load:
    """``rate`` GETs a second for ``seconds``, each on its own connection and thread."""

    def __init__(self, port, rate, seconds):
        self.port, self.rate, self.seconds = port, rate, seconds
        self.results = []  # (start offset s, latency s, error or None)
        self.lock = threading.Lock()
        self.threads = []

    def run(self):
        start = time.monotonic()
        for number in range(int(self.rate * self.seconds)):
            delay = start + number / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=self._one, args=(start,), daemon=True)
            thread.start()
            self.threads.append(thread)
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT + 5)

    def _one(self, start):
        began = time.monotonic()
        try:
            status, body = get(self.port, "/")
            error = None if status == 200 and body == BODY else "status %d, %d bytes" % (
                status, len(body))
        except OSError as exc:
            error = "%s: %s" % (type(exc).__name__, exc)
        with self.lock:
            self.results.append((began - start, time.monotonic() - began, error))


def long_stream(port, outcome):
    """The slow streamed response, read whole: outcome["stream"] says if every line came."""
    try:
        status, body = get(port, "/stream", timeout=STREAM_LINES * STREAM_PAUSE + 30)
        expected = b"".join(b"line %d\n" % n for n in range(STREAM_LINES))
        outcome["stream"] = status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(
            expected).digest()
    except OSError as exc:
        outcome["stream"] = False
        outcome["stream_error"] = str(exc)


def scenario(name, rate, seconds, folder, reuse=True):
    stand = Stand(folder, reuse)
    try:
        agent = stand.agent()
        wait_until(stand.routed, 20, "the route through Traefik")
        load = Load(stand.web_port, rate, seconds)
        loader = threading.Thread(target=load.run)
        outcome = {"scenario": name, "rate": rate, "seconds": seconds, "reuse": reuse}
        loader.start()
        time.sleep(seconds * DISTURB_AT)
        disturbed = time.monotonic()
        if name == "agent-restart":
            agent.popen.send_signal(signal.SIGTERM)
            agent.popen.wait(30)
            outcome["old_agent_exit"] = agent.popen.returncode
            stand.agent()
        elif name == "agent-overlap":
            streamer = threading.Thread(target=long_stream, args=(stand.web_port, outcome))
            streamer.start()
            time.sleep(STREAM_LINES * STREAM_PAUSE / 4)  # the stream is under way
            stand.agent()
            streamer.join(STREAM_LINES * STREAM_PAUSE + 40)
            agent.popen.wait(30)
            outcome["old_agent_exit"] = agent.popen.returncode
        elif name == "cut":
            stand.relay.cut()  # every connection reset, both ways
            stand.relay.passthrough()  # and the path is back for the redial
        elif name == "server-restart":
            outcome["server_gap_s"] = round(stand.restart_server(), 3)
        outcome["disturbance_s"] = round(time.monotonic() - disturbed, 3)
        loader.join()
        failures = [r for r in load.results if r[2] is not None]
        latencies = sorted(r[1] for r in load.results)
        outcome.update(
            requests=len(load.results), failed=len(failures),
            failures=[{"at_s": round(at, 3), "error": error} for at, _, error in failures][:20],
            latency_p50_ms=round(1000 * latencies[len(latencies) // 2], 1),
            latency_max_ms=round(1000 * latencies[-1], 1))
        return outcome
    finally:
        stand.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS + ("all",), default="all")
    parser.add_argument("--rate", type=float, default=50, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20, help="length of the load")
    parser.add_argument("--no-reuse", action="store_true", help="[hook:traefik] "
                        "reuse_connections = no: Traefik opens a connection per request")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="diglett-handover-") as folder:
            results.append(scenario(name, args.rate, args.seconds, folder, not args.no_reuse))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
