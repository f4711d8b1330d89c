"""The real client address end to end: PROXY headers through a real server and agent.

A backend behind ``--proxy-protocol`` must see the client's own address and port; with
``[server] proxy_trusted`` a trusted proxy's PROXY header names the client instead, while any
other source's bytes pass through untouched; a trusted source that sends no valid header is
closed and logged, and the session's other streams carry on. Every test has a deadline.
"""

import socket
import threading

import pytest

from diglett import proxyproto
from diglett.gateway.agent_session import read_proxy_header
from tests.support.harness import Backend, Gateway, echo, recv_exact, wait_until

FORGED_SOURCE = ("203.0.113.7", 4242)  # TEST-NET-3: what the trusted proxy says the client is
FORGED_TARGET = ("198.51.100.1", 443)  # TEST-NET-2: the address that client connected to


def read_header(sock):
    """A backend's side: the PROXY header the agent wrote first, read to its last byte (with
    the same reader the server uses on trusted sources)."""
    return read_proxy_header(sock)


def reporter(sock):
    """Parse the header, answer one line naming both ends, then echo the stream's bytes."""
    sock.settimeout(10)
    header = read_header(sock)
    line = "%s %s\n" % (_text(header.source), _text(header.destination))
    sock.sendall(line.encode())
    echo(sock)  # then whatever follows the header comes back untouched


def _text(address):
    return "-" if address is None else proxyproto.format_address(address)


@pytest.fixture
def backend():
    server = Backend(reporter)
    yield server
    server.close()


def client(port, source="127.0.0.1", host="127.0.0.1"):
    """A connection to the tunnel port from ``source`` (a loopback address) on a port of its own."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock, sock.getsockname()[:2]


def report(sock):
    """The backend's line: (source text, destination text)."""
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            raise AssertionError("EOF before the backend's report, after %r" % line)
        line += data
    source, destination = line.decode().split()
    return source, destination


def echoes(sock, payload=b"hello through the tunnel"):
    sock.sendall(payload)
    return recv_exact(sock, len(payload)) == payload


def gateway_with(tmp_path, **options):
    return Gateway(tmp_path / "gw", **options).start()


def proxy_agent(gateway, backend, tmp_path, via_file=False):
    if via_file:  # the [agent] file, as the systemd unit uses it
        path = tmp_path / "agent.conf"
        path.write_text("[agent]\nproxy-protocol = yes\n")
        extra = ("-c", str(path))
    else:
        extra = ("--proxy-protocol",)
    return gateway.agent("app", backend.address, extra=extra)


# --- the agent tells the backend ---------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("via_file", [False, True], ids=["flag", "config-file"])
def test_backend_sees_the_clients_real_address_and_port(tmp_path, backend, via_file):
    gateway = gateway_with(tmp_path)
    agent = proxy_agent(gateway, backend, tmp_path, via_file)
    sock, (ip, port) = client(agent.port, source="127.0.0.5")
    with sock:
        assert report(sock) == ("127.0.0.5:%d" % port, "127.0.0.1:%d" % agent.port)
        assert echoes(sock)


@pytest.mark.timeout(30)
def test_ipv6_client_address(tmp_path, backend):
    gateway = gateway_with(tmp_path, bind="::1")
    agent = proxy_agent(gateway, backend, tmp_path)
    sock, (ip, port) = client(agent.port, source="::1", host="::1")
    with sock:
        assert report(sock) == ("[::1]:%d" % port, "[::1]:%d" % agent.port)
        assert echoes(sock)


@pytest.mark.timeout(30)
def test_without_the_flag_the_backend_gets_only_the_stream(tmp_path, backend):
    gateway = gateway_with(tmp_path)
    plain = Backend(_first_bytes_back)
    try:
        agent = gateway.agent("plain", plain.address)
        sock, _ = client(agent.port)
        with sock:
            sock.sendall(b"PING")
            assert recv_exact(sock, 4) == b"PING"
    finally:
        plain.close()


def _first_bytes_back(sock):
    sock.sendall(sock.recv(4))


# --- a trusted proxy in front of the tunnel port -----------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["v2", "v1", "local"])
def test_trusted_proxy_header_names_the_client(tmp_path, backend, kind):
    gateway = gateway_with(tmp_path, proxy_trusted="127.0.0.1")
    agent = proxy_agent(gateway, backend, tmp_path)
    sock, own = client(agent.port, source="127.0.0.1")
    header = {
        "v2": proxyproto.encode_v2(FORGED_SOURCE, FORGED_TARGET),
        "v1": b"PROXY TCP4 %s %s %d %d\r\n" % (FORGED_SOURCE[0].encode(), FORGED_TARGET[0].encode(),
                                              FORGED_SOURCE[1], FORGED_TARGET[1]),
        "local": proxyproto.encode_local(),  # the proxy's own health check: real endpoints
    }[kind]
    with sock:
        sock.sendall(header + b"first bytes in the same segment")
        expected = ("203.0.113.7:4242", "198.51.100.1:443")
        if kind == "local":
            expected = ("127.0.0.1:%d" % own[1], "127.0.0.1:%d" % agent.port)
        assert report(sock) == expected
        assert recv_exact(sock, 31) == b"first bytes in the same segment"
        assert echoes(sock)


@pytest.mark.timeout(30)
def test_a_header_trickling_in_byte_by_byte_is_read_exactly(tmp_path, backend):
    gateway = gateway_with(tmp_path, proxy_trusted="127.0.0.0/8")
    agent = proxy_agent(gateway, backend, tmp_path)
    sock, _ = client(agent.port)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in proxyproto.encode_v2(FORGED_SOURCE, FORGED_TARGET):
            sock.send(bytes([byte]))
        assert report(sock) == ("203.0.113.7:4242", "198.51.100.1:443")
        assert echoes(sock)


@pytest.mark.timeout(30)
def test_an_untrusted_sources_proxy_bytes_reach_the_backend_as_data(tmp_path, backend):
    gateway = gateway_with(tmp_path, proxy_trusted="127.0.0.1")
    agent = proxy_agent(gateway, backend, tmp_path)
    sock, (ip, port) = client(agent.port, source="127.0.0.9")
    forged = proxyproto.encode_v2(FORGED_SOURCE, FORGED_TARGET) + b"PROXY TCP4 1.2.3.4\r\n"
    with sock:
        sock.sendall(forged)
        assert report(sock) == ("127.0.0.9:%d" % port, "127.0.0.1:%d" % agent.port)
        assert recv_exact(sock, len(forged)) == forged  # untouched, after the agent's header


@pytest.mark.timeout(40)
def test_a_trusted_source_without_a_header_is_closed_and_others_carry_on(tmp_path, backend):
    gateway = gateway_with(tmp_path, proxy_trusted="127.0.0.1")
    agent = proxy_agent(gateway, backend, tmp_path)
    header = proxyproto.encode_v2(FORGED_SOURCE, FORGED_TARGET)
    busy, _ = client(agent.port)  # a stream that stays open across the failures
    busy.sendall(header)
    assert report(busy)[0] == "203.0.113.7:4242"

    silent, _ = client(agent.port)  # sends nothing: closed after the header timeout
    for garbage in (b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c",
                    b"PROXY TCP4 not an address\r\n"):
        bad, _ = client(agent.port)
        with bad:
            bad.sendall(garbage)
            assert _closed(bad), garbage
        assert echoes(busy)
    untrusted, _ = client(agent.port, source="127.0.0.2")  # the common path is unaffected
    with untrusted:
        untrusted.sendall(b"no header here")
        assert report(untrusted)[0].startswith("127.0.0.2:")
        assert recv_exact(untrusted, 14) == b"no header here"
    with silent:
        assert _closed(silent, timeout=10)
    wait_until(lambda: gateway.proc.stderr().count("no valid PROXY header") >= 4, 5,
               what="four logged refusals")
    log = gateway.proc.stderr()
    assert "no complete header within 5 s" in log
    assert "no PROXY protocol signature" in log
    assert "GET" not in log  # the peer's bytes are never logged
    with busy:
        assert echoes(busy)
    fresh, _ = client(agent.port)
    with fresh:
        fresh.sendall(header)
        assert report(fresh)[0] == "203.0.113.7:4242"
        assert echoes(fresh)
    assert gateway.proc.popen.poll() is None


def _closed(sock, timeout=5):
    """True once the server closed ``sock`` (EOF or reset) without sending anything."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.timeout(40)
def test_many_trusted_connections_at_once(tmp_path, backend):
    """Header reads run beside the accept loop: a slow proxy connection holds up no other."""
    gateway = gateway_with(tmp_path, proxy_trusted="127.0.0.1")
    agent = proxy_agent(gateway, backend, tmp_path)
    stalled = [client(agent.port)[0] for _ in range(20)]  # half a signature, then nothing
    for sock in stalled:
        sock.sendall(b"\r\n\r\n\x00")
    results = []

    def one(index):
        sock, _ = client(agent.port)
        with sock:
            sock.sendall(proxyproto.encode_v2(("192.0.2.%d" % (index + 1), 1000 + index),
                                              FORGED_TARGET))
            results.append(report(sock)[0] == "192.0.2.%d:%d" % (index + 1, 1000 + index)
                           and echoes(sock))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == [True] * 30
    for sock in stalled:
        sock.close()
