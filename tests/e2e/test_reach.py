"""Reach end to end, real processes only: agents through one Traefik on one HTTPS port (TLS
passthrough by SNI, WebSocket by Host + path) while the same port serves an HTTPS site through
a tunnel; agents behind tinyproxy that lets CONNECT out to that port only, with and without
proxy authentication; failover between a wss:// and a tcp:// gateway; and bad input on the new
listeners (a non-diglett client on the WebSocket path, a TLS client naming another server, a
proxy that closes mid-handshake), each one log line while the tunnels carry on; and SOCKS5
through OpenSSH's dynamic forward."""

import getpass
import hashlib
import os
import re
import shutil
import ssl
import threading

import pytest

from tests.support import harness
from tests.support.reachfixtures import (
    DOMAIN,
    Edge,
    Site,
    TinyProxy,
    agent_with_key,
    reach_gateway,
    restart_reach_gateway,
    start_agent,
)
from tests.support.sshd import start_sshd

BULK = 8 * 1024 * 1024  # bytes each way per transport check
BANNER = b"220 backend speaks first\r\n"


@pytest.fixture
def echo_backend():
    backend = harness.Backend(harness.greeter(BANNER))  # speaks first, then echoes
    yield backend
    backend.close()


@pytest.fixture
def gateway(tmp_path):
    return reach_gateway(tmp_path / "gw")


def check_bytes_both_ways(port, size=BULK, seed=b"reach"):
    """The backend's banner arrives before we send anything; then ``size`` seeded bytes go up
    and come back, compared by hash while both directions run at once."""
    sock = harness.connect(port, 20)
    try:
        assert harness.recv_exact(sock, len(BANNER)) == BANNER
        sender = threading.Thread(target=harness.send_seeded, args=(sock, size, seed))
        sender.start()
        assert harness.recv_sha256(sock, size) == harness.seeded_sha256(size, seed)
        sender.join(20)
    finally:
        sock.close()


@pytest.mark.timeout(90)
def test_one_traefik_port_serves_an_https_site_and_both_agent_transports(
        tmp_path, gateway, echo_backend):
    body = os.urandom(512 * 1024)
    site = Site(body)
    site_port = harness.free_port()
    edge = Edge(tmp_path / "edge").start(gateway.tls_port, gateway.ws_port,
                                         sites=[("site.%s" % DOMAIN, site_port)])
    try:
        # the site's agent dials TLS through the shared port (SNI passthrough) ...
        start_agent(gateway, "site", edge.tls_url, site.address, extra=["--proxy", "none"],
                    grant=["--port", str(site_port)])
        # ... a second agent dials the WebSocket route of the same port
        ws_agent = start_agent(gateway, "bulk", edge.wss_url, echo_backend.address,
                               extra=["--proxy", "none"])
        status, answer = edge.https_get("site.%s" % DOMAIN)
        assert status == 200
        assert hashlib.sha256(answer).digest() == hashlib.sha256(body).digest()
        check_bytes_both_ways(ws_agent.port)
        sessions = {row["subdomain"] for row in gateway.sessions()}
        assert sessions >= {"site", "bulk"}
    finally:
        site.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tls", "wss", "tls-direct", "ws-direct"])
def test_bytes_intact_both_ways_and_the_backend_may_speak_first(
        tmp_path, gateway, echo_backend, transport):
    if transport.endswith("direct"):  # no Traefik: the agent dials the listener itself
        url = ("tls://127.0.0.1:%d" % gateway.tls_port if transport == "tls-direct"
               else "ws://127.0.0.1:%d/diglett" % gateway.ws_port)
    else:
        edge = Edge(tmp_path / "edge").start(gateway.tls_port, gateway.ws_port)
        url = edge.tls_url if transport == "tls" else edge.wss_url
    agent = start_agent(gateway, "t", url, echo_backend.address, extra=["--proxy", "none"])
    check_bytes_both_ways(agent.port)
    done = []  # several streams at once over the one outer connection

    def stream(seed):
        check_bytes_both_ways(agent.port, 1 << 20, seed)
        done.append(seed)

    threads = [threading.Thread(target=stream, args=(b"s%d" % n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(done) == 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("auth", [False, True], ids=["open-proxy", "proxy-auth"])
def test_an_agent_behind_a_proxy_that_allows_connect_to_443_only(
        tmp_path, gateway, echo_backend, auth):
    edge = Edge(tmp_path / "edge").start(gateway.tls_port, gateway.ws_port)
    proxy = TinyProxy(tmp_path / "proxy", allowed_port=edge.port, auth=auth).start()
    key_file, public = gateway.new_key("corp")
    gateway.grant("corp", public)
    for url in (edge.wss_url, edge.tls_url):  # both transports, through the environment
        agent = agent_with_key(gateway, "corp", url, echo_backend.address, key_file,
                               env={"https_proxy": proxy.url(), "NO_PROXY": "example.org"})
        check_bytes_both_ways(agent.port, 2 << 20)
        assert agent.stop() == 0
    assert "CONNECT %s:%d" % ("127.0.0.1", edge.port) in proxy.log()
    # The raw port is not 443: the proxy refuses, and the agent says so and exits 9.
    refused = agent_with_key(gateway, "corp", gateway.gateway, echo_backend.address, key_file,
                             extra=["--proxy", proxy.url()], wait=False)
    assert refused.wait(20) == 9
    assert "refused to connect to %s: 403" % gateway.gateway in refused.stderr()
    if auth:
        anonymous = agent_with_key(gateway, "corp", edge.wss_url, echo_backend.address,
                                   key_file, extra=["--proxy", proxy.url(credentials=False)],
                                   wait=False)
        assert anonymous.wait(20) == 9
        assert "407 Proxy Authentication Required (the proxy wants credentials" in \
            anonymous.stderr()


@pytest.mark.timeout(120)
def test_failover_between_a_wss_and_a_tcp_gateway(tmp_path, gateway, echo_backend):
    edge = Edge(tmp_path / "edge").start(ws_port=gateway.ws_port)
    second = harness.Gateway(tmp_path / "gw2", domain=DOMAIN)
    shared_key = second.workdir / "server.key"  # one fleet, one server key to pin
    shared_key.write_bytes((gateway.workdir / "server.key").read_bytes())
    shared_key.chmod(0o600)
    second.start()
    key_file, public = gateway.new_key("fo")
    gateway.grant("fo", public)
    second.grant("fo", public)
    agent = agent_with_key(gateway, "fo", "%s,%s" % (edge.wss_url, second.gateway),
                           echo_backend.address, key_file, extra=["--proxy", "none"])
    check_bytes_both_ways(agent.port, 1 << 20)
    gateway.proc.kill()  # the wss gateway dies: the agent moves to the tcp one
    agent.wait_up(30, count=2)
    check_bytes_both_ways(agent.port, 1 << 20)
    assert [row["subdomain"] for row in second.sessions()] == ["fo"]
    second.proc.kill()  # and back: the wss gateway returns, the tcp one is gone
    restart_reach_gateway(gateway)
    agent.wait_up(60, count=3)
    check_bytes_both_ways(agent.port, 1 << 20)


@pytest.mark.timeout(90)
def test_bad_input_on_the_new_listeners_is_one_log_line_each(tmp_path, gateway, echo_backend):
    edge = Edge(tmp_path / "edge").start(gateway.tls_port, gateway.ws_port)
    agent = start_agent(gateway, "calm", edge.wss_url, echo_backend.address,
                        extra=["--proxy", "none"])
    # 1. a plain HTTPS request on the WebSocket path: the gateway answers 400 through Traefik
    status, _ = edge.https_get("127.0.0.1", "/diglett")
    assert status == 400
    gateway.proc.wait_for(r"agent=127\.0\.0\.1:\d+ ws handshake failed: not a WebSocket upgrade")
    # 2. a TLS client naming another server: through Traefik it never reaches the gateway
    # (Traefik's own 404), and straight at the TLS listener it gets an alert and a log line
    assert edge.https_get("wrong.example.org", server_name="wrong.example.org")[0] == 404
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
        with context.wrap_socket(harness.connect(gateway.tls_port),
                                 server_hostname="wrong.example.org"):
            pass
    gateway.proc.wait_for(r"tls handshake failed: server name 'wrong.example.org' is not "
                          r"localhost or a name under it")
    # 3. TLS with a good name but junk inside: the Noise handshake's own log line
    with context.wrap_socket(harness.connect(gateway.tls_port), server_hostname=DOMAIN) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
        sock.settimeout(10)
        try:
            sock.recv(100)
        except OSError:
            pass
    gateway.proc.wait_for(r"agent=127\.0\.0\.1:\d+ handshake failed: bad magic")
    failures = gateway.http_get("/debug/stats")["handshake_failures"]  # the metric's counts
    assert failures.get("websocket upgrade") == 1 and failures.get("tls handshake") == 1, failures
    # nothing else disturbed: the agent's tunnel carries on, and a new agent gets in
    check_bytes_both_ways(agent.port, 1 << 20)
    start_agent(gateway, "later", edge.tls_url, echo_backend.address, extra=["--proxy", "none"])
    assert "reconnecting" not in agent.stderr()


class ClosingProxy:
    """A 'proxy' that reads the CONNECT and closes the connection without an answer."""

    def __init__(self):
        self.seen = []

        def handler(sock):
            self.seen.append(sock.recv(4096))
            sock.close()

        self.backend = harness.Backend(handler)
        self.port = self.backend.address[1]


@pytest.mark.timeout(60)
def test_a_proxy_that_closes_mid_handshake_is_logged_and_retried(tmp_path, gateway,
                                                                 echo_backend):
    closing = ClosingProxy()
    try:
        agent = start_agent(gateway, "px", "wss://127.0.0.1:%d/diglett" % gateway.ws_port,
                            echo_backend.address, extra=["--proxy",
                                                         "http://127.0.0.1:%d" % closing.port],
                            wait=False)
        agent.wait_for(r"proxy 127\.0\.0\.1:%d \(--proxy\) closed the connection before "
                       r"answering CONNECT; reconnecting in" % closing.port, 20)
        assert agent.popen.poll() is None  # retried, not fatal
        assert closing.seen and closing.seen[0].startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1"
                                                           % gateway.ws_port)
        other = start_agent(gateway, "ok", "ws://127.0.0.1:%d/diglett" % gateway.ws_port,
                            echo_backend.address, extra=["--proxy", "none"])
        check_bytes_both_ways(other.port, 1 << 20)
    finally:
        closing.backend.close()




@pytest.mark.timeout(90)
def test_an_agent_through_a_real_socks5_proxy(tmp_path, gateway, echo_backend):
    """OpenSSH's dynamic forward (ssh -D) is the SOCKS5 proxy; socks5h: it resolves the name."""
    if not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"):
        pytest.fail("needs openssh-server and ssh: ./scripts/bootstrap --test installs them")
    edge = Edge(tmp_path / "edge").start(gateway.tls_port, gateway.ws_port)
    sshd_port, client_key = start_sshd(tmp_path / "ssh")
    socks_port = harness.free_port()
    socks = harness.Proc([
        "ssh", "-v", "-F", "/dev/null", "-N", "-D", "127.0.0.1:%d" % socks_port,
        "-p", str(sshd_port), "-i", str(client_key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ExitOnForwardFailure=yes", "%s@127.0.0.1" % getpass.getuser()],
        tmp_path, "ssh-socks")
    harness.wait_until(lambda: _connects(socks_port, socks), 20, what="ssh -D to listen")
    agent = start_agent(gateway, "sox", edge.tls_url, echo_backend.address,
                        env={"all_proxy": "socks5h://127.0.0.1:%d" % socks_port})
    check_bytes_both_ways(agent.port, 2 << 20)
    # ssh -v names each SOCKS request it served: the agent's connection went through it
    assert re.search(r"forwarding to socks port", socks.stderr())


def _connects(port, proc):
    if proc.popen.poll() is not None:
        raise AssertionError("ssh exited: %s" % proc.stderr())
    try:
        harness.connect(port, 1).close()
        return True
    except OSError:
        return False
