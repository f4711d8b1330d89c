"""Gateway addresses as users write them: ``host:port``, ``tls://host[:443]``,
``wss://host[:443]/path``, ``ws://host[:80]/path`` (and ``tcp://host:port``).

Parsing only: no DNS, no sockets. Errors are ValueErrors that name the bad text and show a
form that works.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("tcp", "tls", "ws", "wss")
DEFAULT_PORTS = {"tls": 443, "wss": 443, "ws": 80}  # tcp has none: the raw port must be given
DEFAULT_WS_PATH = "/diglett"  # the server's ws_path default
EXAMPLES = "gw.example.com:20000, tls://gw.example.com:443 or wss://gw.example.com/diglett"


class GatewayUrlError(ValueError):
    pass


@dataclass(frozen=True)
class GatewayUrl:
    scheme: str  # one of SCHEMES
    host: str  # a name or an IP address, without brackets
    port: int
    path: str = ""  # the WebSocket path (ws, wss); empty otherwise

    @property
    def address(self):
        return self.host, self.port

    @property
    def tls(self):
        """Whether the agent speaks TLS first (to the server itself, or to Traefik)."""
        return self.scheme in ("tls", "wss")

    @property
    def websocket(self):
        return self.scheme in ("ws", "wss")

    def __str__(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        if self.scheme == "tcp":
            return "%s:%d" % (host, self.port)
        return "%s://%s:%d%s" % (self.scheme, host, self.port, self.path)


def parse(text):
    """One gateway; GatewayUrlError says what is wrong with ``text``."""
    text = text.strip()
    try:
        parts = urlsplit(text if "://" in text else "tcp://" + text)
        port = parts.port
    except ValueError as exc:
        raise GatewayUrlError("bad gateway %r: %s (write %s)" % (text, exc, EXAMPLES)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise GatewayUrlError("bad gateway %r: unknown scheme %r (use %s)"
                              % (text, parts.scheme, ", ".join(s + "://" for s in SCHEMES)))
    if not parts.hostname:
        raise GatewayUrlError("bad gateway %r: no host (write %s)" % (text, EXAMPLES))
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
        if port is None:
            raise GatewayUrlError("bad gateway %r: missing :PORT (write e.g. %s:20000)"
                                  % (text, parts.hostname))
    if not 0 < port < 65536:
        raise GatewayUrlError("bad gateway %r: port must be 1-65535" % text)
    if parts.query or parts.fragment or parts.username:
        raise GatewayUrlError("bad gateway %r: only SCHEME://HOST:PORT/PATH is understood"
                              % text)
    path = parts.path
    if scheme in ("tcp", "tls") and path not in ("", "/"):
        raise GatewayUrlError("bad gateway %r: a path needs ws:// or wss://" % text)
    if scheme in ("ws", "wss"):
        path = path or DEFAULT_WS_PATH
    else:
        path = ""
    return GatewayUrl(scheme, parts.hostname, port, path)


def parse_list(text):
    """Comma-separated gateways (a fleet, tried in turn)."""
    gateways = [parse(item) for item in text.split(",") if item.strip()]
    if not gateways:
        raise GatewayUrlError("no gateway given (write %s)" % EXAMPLES)
    return gateways
