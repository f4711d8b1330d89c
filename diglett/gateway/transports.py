"""The gateway's tls:// and wss:// listeners: the outer layer comes off here, and the
connection then takes exactly the path of a raw one (server._handle_agent: the handshake,
admission, the session): TLS as a TlsSocket the tunnel drives itself, a WebSocket as a
spliced socket (diglett.reach.splice).

Admission is the same AgentListener accept loop, so a flood through port 443 meets the same
limits. The outer handshake (TLS, or the HTTP upgrade) runs in the connection's greenlet under
handshake_timeout; a failure is one log line naming the peer and what it sent, a count in the
handshake_failures metric, and a closed socket (no admission penalty: behind Traefik the
source is Traefik's address). The Noise handshake, its deadline, and server-key pinning are
not touched: the outer layer is only for getting through.
"""

import logging
import ssl

import gevent
from gevent import monkey

from diglett.gateway.listener import AgentListener
from diglett.reach import certificate
from diglett.reach.splice import splice
from diglett.reach.tls_socket import TlsSocket
from diglett.reach.websocket import WebSocketRefused, WebSocketStream
from diglett.sockets import enable_keepalive, set_nodelay

log = logging.getLogger(__name__)


KINDS = ("tls", "ws")  # the listeners: listen_tls, listen_ws
OUTER_FAILURE = {"tls": "tls handshake", "ws": "websocket upgrade"}  # handshake_failures labels


class OuterTimeout(Exception):
    pass


class WrongName(ValueError):
    """The TLS client asked for a server name that is not ours."""


def start(config, admission_control, handle, failures, bind=True, inherited=None):
    """The configured transport listeners, started; ``handle(sock, address, source)`` is the
    server's own agent handler, ``failures`` the handshake failure counts (the metric's), where
    outer failures count as OUTER_FAILURE[kind]. Returns the listeners (``kind``, ``address``).
    ``bind=False``: a worker's, fed by the master through ``serve``. ``inherited``: {kind:
    socket} passed on by the last run (diglett.handoff), used when it listens where configured.
    """
    inherited = inherited or {}
    listeners = []
    if config.listen_tls is not None:
        context = server_context(*certificate.files(config), domain=config.domain)
        listeners.append(TransportListener("tls", config.listen_tls, admission_control, handle,
                                           lambda sock: _tls(context, sock), config, failures,
                                           bind, inherited.get("tls")))
    if config.listen_ws is not None:
        path = config.ws_path
        listeners.append(TransportListener("ws", config.listen_ws, admission_control, handle,
                                           lambda sock: _ws(sock, path), config, failures, bind,
                                           inherited.get("ws")))
    for listener in listeners:
        listener.start()
        if bind:
            log.info("agents over %s on %s:%d", listener.kind, *listener.address)
    return listeners


def server_context(cert_path, key_path, domain):
    """TLS for agents: the certificate is never checked by them, but the server name is
    checked here, so a client that meant another site learns at once (an alert) and the log
    names what it asked for."""
    # The stdlib class even when monkey-patched: gevent's wraps sni_callback for its own ssl
    # sockets, and TlsSocket's memory BIOs need none of gevent's I/O.
    context = monkey.get_original("ssl", "SSLContext")(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 at least is the default; setting minimum_version on the original class would
    # recurse under monkey-patching (its property looks up the patched ssl.SSLContext).
    context.load_cert_chain(cert_path, key_path)
    context.num_tickets = 0  # no resumption (agents reconnect rarely): no tickets to send
    context.sni_callback = lambda sock, name, _context: _check_name(sock, name, domain)
    return context


def _check_name(sock, name, domain):
    """SNI must be ``domain`` or a name under it (tunnel.example.com); no SNI (an agent that
    dialled an IP address) is fine."""
    if name is None or name == domain or name.endswith("." + domain):
        return None
    sock.refused_name = "server name %r is not %s or a name under it" % (name[:100], domain)
    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


class TransportListener(AgentListener):
    def __init__(self, kind, address, admission_control, handle, unwrap, config, failures,
                 bind=True, inherited=None):
        super().__init__(address, admission_control, self._outer, inherited, bind=bind)
        self.kind = kind  # "tls" or "ws", for log lines
        self.unwrap = unwrap  # plain socket -> a socket-like the tunnel code can drive
        self.inner_handle = handle
        self.config = config
        self.failures = failures  # label -> count, shared with the Noise handshakes

    def _outer(self, sock, address, source):
        peer = "%s:%d" % address[:2]
        set_nodelay(sock)  # here: behind a splice the server's own calls reach a socketpair
        enable_keepalive(sock)
        try:
            with gevent.Timeout(self.config.handshake_timeout, OuterTimeout):
                inner = self.unwrap(sock)
        except (OuterTimeout, OSError, ValueError) as exc:
            label = OUTER_FAILURE[self.kind]
            self.failures[label] = self.failures.get(label, 0) + 1
            log.info("agent=%s %s handshake failed: %s", peer, self.kind,
                     _describe(exc, self.config.handshake_timeout))
            # No penalty: behind Traefik every source is Traefik's address, and one scanner's
            # junk must not lock out the agents that share it.
            self.admission.release(source)  # the Noise handshake would have released it
            sock.close()
            return
        self.inner_handle(inner, address, source)


def _tls(context, sock):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    try:
        return TlsSocket(sock, tls, incoming, outgoing).handshake()
    except ssl.SSLError as exc:
        refused = getattr(tls, "refused_name", None)
        raise (WrongName(refused) if refused else exc) from None


def _ws(sock, path):
    peer = "%s:%d" % sock.getpeername()[:2]
    return splice(WebSocketStream.accept(sock, path), "agent=%s" % peer)


def _describe(exc, timeout):
    if isinstance(exc, OuterTimeout):
        return "no TLS or upgrade within %s s" % timeout
    if isinstance(exc, (WebSocketRefused, WrongName)):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        return "TLS: %s" % (exc.reason or exc)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
