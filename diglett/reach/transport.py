"""The agent's side of a transport: dial a gateway (directly or through its proxy), then put on
the outer layers its URL asks for (TLS, a WebSocket), and return a socket for the handshake.

A tcp:// gateway without a proxy is today's plain connection, untouched. The outer TLS does not
check the gateway's certificate: the Noise handshake pins the server's key, which is what makes
the connection safe, and a TLS certificate check would only add a second, weaker trust path.
"""

import ipaddress
import ssl

from gevent import socket

from diglett.reach.proxy_handshake import ProxyFailed, ProxyRefused, open_tunnel
from diglett.reach.splice import splice
from diglett.reach.tls_socket import TlsSocket
from diglett.reach.websocket import WebSocketRefused, WebSocketStream
from diglett.sockets import enable_keepalive, set_nodelay

__all__ = ["ProxyFailed", "ProxyRefused", "WebSocketRefused", "dial"]

DEFAULT_PORTS = {"ws": 80, "wss": 443}  # left out of the Host header, as browsers do


def dial(gateway, proxy, timeout, source=None):
    """A connected socket to ``gateway`` (a GatewayUrl) through ``proxy`` (a Proxy or None),
    from the local address ``source`` (an IP, or None: the kernel's choice). OSError
    (ProxyFailed, WebSocketRefused and ssl errors among them) or ProxyRefused."""
    sock = socket.create_connection(proxy and (proxy.host, proxy.port) or gateway.address,
                                    timeout=timeout,
                                    source_address=None if source is None else (source, 0))
    base = sock  # the socket object that owns the file descriptor (the TLS one, once wrapped)
    # On the TCP socket itself: behind a splice the tunnel's own calls reach only a socketpair
    # (without NODELAY, Nagle and delayed ACKs cost fresh streams 40 ms).
    set_nodelay(sock)
    enable_keepalive(sock)
    try:
        if proxy is not None:
            open_tunnel(sock, proxy, gateway.host, gateway.port)
        if gateway.scheme == "tcp":
            return sock
        if gateway.tls:
            base = client_tls(sock, gateway.host)
        if not gateway.websocket:
            base.settimeout(None)  # from here the tunnel's keepalive watches the connection
            return base  # a TlsSocket: the tunnel drives TLS itself, no relay, no extra copy
        outer = WebSocketStream.connect(base, host_header(gateway), gateway.path)
    except BaseException:
        base.close()
        sock.close()
        raise
    base.settimeout(None)
    return splice(outer, "gateway=%s" % gateway)


def client_tls(sock, host):
    """TLS to a gateway or the Traefik in front of it: SNI names ``host`` (routing),
    and no certificate check (see the module docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])  # WebSocket upgrades are HTTP/1.1
    return TlsSocket.client(context, sock, None if _is_ip(host) else host)


def host_header(gateway):
    host = "[%s]" % gateway.host if ":" in gateway.host else gateway.host
    if gateway.port == DEFAULT_PORTS.get(gateway.scheme):
        return host
    return "%s:%d" % (host, gateway.port)


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
