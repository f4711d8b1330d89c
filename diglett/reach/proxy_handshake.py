"""Opening a tunnel through a proxy on an already connected socket: HTTP CONNECT (h11 reads the
proxy's answer) or SOCKS5 (RFC 1928, with RFC 1929 user/password), under the caller's deadline.

A proxy that answers no is a ProxyRefused carrying its answer (``403 Forbidden``, ``407``),
which the agent turns into an exit code; a proxy that breaks the exchange, or cannot reach the
gateway (``502``, SOCKS "host unreachable"), is a ProxyFailed (an OSError, retried like any
failed connect). Nothing here knows diglett's protocol.
"""

import base64
import ipaddress
import struct

import h11
from gevent import socket

from diglett import __version__
from diglett.sockets import recv_exact

RECV_SIZE = 16 * 1024  # bytes per read of the proxy's answer
MAX_ANSWER = 64 * 1024  # a CONNECT answer longer than this is no proxy's
SOCKS_VERSION = 5
SOCKS_NO_AUTH, SOCKS_USER_PASS, SOCKS_NO_METHOD = 0x00, 0x02, 0xFF
SOCKS_CONNECT = 1
SOCKS_IPV4, SOCKS_NAME, SOCKS_IPV6 = 1, 3, 4
SOCKS_PERMANENT = (2, 7, 8)  # the ruleset or the protocol says no; the rest may heal
SOCKS_REPLIES = {  # RFC 1928 section 6
    1: "general SOCKS server failure", 2: "connection not allowed by ruleset",
    3: "network unreachable", 4: "host unreachable", 5: "connection refused",
    6: "TTL expired", 7: "command not supported", 8: "address type not supported",
}


class ProxyRefused(Exception):
    """The proxy answered, and the answer is no (an HTTP status >= 300, a SOCKS reply)."""

    def __init__(self, proxy, target, answer):
        super().__init__("proxy %s:%d refused to connect to %s: %s"
                         % (proxy.host, proxy.port, target, answer))
        self.answer = answer


class ProxyFailed(ConnectionError):
    """The proxy closed the connection or sent something that is not an answer."""

    def __init__(self, proxy, what):
        super().__init__("proxy %s:%d (%s) %s" % (proxy.host, proxy.port, proxy.source, what))


def open_tunnel(sock, proxy, host, port):
    """Ask ``proxy`` (connected as ``sock``) for a connection to ``host:port``."""
    try:
        if proxy.scheme == "http":
            http_connect(sock, proxy, host, port)
        else:
            socks5_connect(sock, proxy, host, port)
    except ConnectionError as exc:
        if isinstance(exc, ProxyFailed):
            raise
        raise ProxyFailed(proxy, "closed the connection during the handshake (%s)" % exc) from None


def http_connect(sock, proxy, host, port):
    target = "%s:%d" % (("[%s]" % host) if ":" in host else host, port)
    headers = [("Host", target), ("User-Agent", "diglett/%s" % __version__)]
    if proxy.username:
        credentials = "%s:%s" % (proxy.username, proxy.password)
        headers.append(("Proxy-Authorization",
                        "Basic " + base64.b64encode(credentials.encode()).decode("ascii")))
    client = h11.Connection(h11.CLIENT)
    sock.sendall(client.send(h11.Request(method="CONNECT", target=target, headers=headers)))
    response = _read_response(sock, client, proxy)
    if not 200 <= response.status_code < 300:
        answer = "%d %s" % (response.status_code, response.reason.decode("latin-1"))
        if response.status_code >= 500:  # 502, 503, 504: the gateway is down or far away
            raise ProxyFailed(proxy, "could not reach %s: %s" % (target, answer))
        if response.status_code == 407:
            answer += (" (the proxy wants credentials: give them as http://USER:PASSWORD@HOST:PORT"
                       if not proxy.username else " (the proxy did not accept the credentials")
            answer += " in --proxy or %s)" % proxy.source
        raise ProxyRefused(proxy, target, answer)
    if client.trailing_data[0]:
        # Gateways never speak first, so bytes here are the proxy's, not the gateway's.
        raise ProxyFailed(proxy, "sent bytes after its 2xx answer to CONNECT")


def _read_response(sock, client, proxy):
    received = 0
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyFailed(proxy, "sent a bad answer to CONNECT: %s" % exc) from None
        if event is h11.NEED_DATA:
            data = sock.recv(RECV_SIZE)
            received += len(data)
            if not data:
                raise ProxyFailed(proxy, "closed the connection before answering CONNECT")
            if received > MAX_ANSWER:
                raise ProxyFailed(proxy, "sent an answer longer than %d bytes" % MAX_ANSWER)
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            return event
        # an InformationalResponse (1xx): keep reading


def socks5_connect(sock, proxy, host, port):
    methods = bytes([SOCKS_USER_PASS]) if proxy.username else bytes([SOCKS_NO_AUTH])
    sock.sendall(bytes([SOCKS_VERSION, len(methods)]) + methods)
    version, method = recv_exact(sock, 2)
    if version != SOCKS_VERSION:
        raise ProxyFailed(proxy, "is not a SOCKS5 proxy (version byte %d)" % version)
    if method == SOCKS_NO_METHOD:
        raise ProxyRefused(proxy, "%s:%d" % (host, port), "no acceptable authentication "
                           "method" + ("" if proxy.username else " (give USER:PASSWORD@)"))
    if method == SOCKS_USER_PASS:
        _socks5_login(sock, proxy, host, port)
    sock.sendall(struct.pack("!BBB", SOCKS_VERSION, SOCKS_CONNECT, 0)
                 + _socks5_address(proxy, host) + struct.pack("!H", port))
    version, reply, _reserved, kind = recv_exact(sock, 4)
    if reply != 0 and reply not in SOCKS_PERMANENT:
        raise ProxyFailed(proxy, "could not reach %s:%d: SOCKS reply %d (%s)"
                          % (host, port, reply, SOCKS_REPLIES.get(reply, "unknown")))
    if reply != 0:
        raise ProxyRefused(proxy, "%s:%d" % (host, port),
                           "SOCKS reply %d (%s)" % (reply, SOCKS_REPLIES.get(reply, "unknown")))
    size = {SOCKS_IPV4: 4, SOCKS_IPV6: 16}.get(kind)
    if size is None:
        size = recv_exact(sock, 1)[0]
    recv_exact(sock, size + 2)  # the proxy's bound address and port: not needed


def _socks5_login(sock, proxy, host, port):
    user, password = proxy.username.encode(), proxy.password.encode()
    sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    _version, status = recv_exact(sock, 2)
    if status != 0:
        raise ProxyRefused(proxy, "%s:%d" % (host, port), "user/password not accepted")


def _socks5_address(proxy, host):
    """socks5h sends the name; socks5 resolves it here first, as curl does."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if proxy.scheme == "socks5h":
            name = host.encode("idna")
            return bytes([SOCKS_NAME, len(name)]) + name
        address = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
    kind = SOCKS_IPV4 if address.version == 4 else SOCKS_IPV6
    return bytes([kind]) + address.packed
