"""Which proxy an agent dials a gateway through: ``--proxy`` / the ``proxy`` key, else the
environment as curl and pip read it.

``https_proxy`` / ``HTTPS_PROXY`` serve tls:// and wss:// gateways, ``http_proxy`` (lowercase
only, as curl: ``HTTP_PROXY`` may be set by a CGI request) serves ws://, and ``all_proxy`` /
``ALL_PROXY`` every scheme, raw tcp:// included. ``no_proxy`` / ``NO_PROXY`` names hosts that
are dialled directly: ``*``, names (``example.com`` also matches its subdomains, a leading dot
is optional), IP addresses and CIDR ranges. ``--proxy none`` turns every proxy off. Parsing and
choosing only: no sockets here.
"""

import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

SCHEMES = ("http", "socks5", "socks5h")  # socks5h: the proxy resolves the gateway's name
DEFAULT_PORTS = {"http": 3128, "socks5": 1080, "socks5h": 1080}
OFF = ("none", "direct", "off")  # --proxy values that turn proxies off, env included
ENV_BY_SCHEME = {
    "tls": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "wss": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "ws": ("http_proxy", "all_proxy", "ALL_PROXY"),
    "tcp": ("all_proxy", "ALL_PROXY"),
}


class ProxyUrlError(ValueError):
    pass


@dataclass(frozen=True)
class Proxy:
    scheme: str  # one of SCHEMES
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)  # never printed
    source: str = "--proxy"  # where it came from, for log lines: --proxy or the env variable

    def __str__(self):
        user = "%s:***@" % self.username if self.username else ""
        return "%s://%s%s:%d" % (self.scheme, user, self.host, self.port)


def parse(text, source="--proxy"):
    """``[scheme://][user:password@]host[:port]``; scheme http (the default) or socks5(h)."""
    shown = text.split("@")[-1]  # the error must not echo a password
    parts = urlsplit(text if "://" in text else "http://" + text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ProxyUrlError("%s: unsupported proxy scheme %r in %r (use http://, socks5:// "
                            "or socks5h://)" % (source, parts.scheme, shown))
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ProxyUrlError("%s: bad proxy %r: %s" % (source, shown, exc)) from None
    if not parts.hostname:
        raise ProxyUrlError("%s: bad proxy %r: no host" % (source, shown))
    return Proxy(scheme, parts.hostname, port, unquote(parts.username or ""),
                 unquote(parts.password or ""), source)


def choose(gateway, explicit=None, environ=None):
    """The Proxy for ``gateway`` (a GatewayUrl), or None to dial it directly."""
    environ = os.environ if environ is None else environ
    if explicit is not None and explicit.strip().lower() in OFF + ("",):
        return None
    if bypassed(gateway.host, environ.get("no_proxy", environ.get("NO_PROXY", ""))):
        return None
    if explicit is not None:
        return parse(explicit.strip())
    for name in ENV_BY_SCHEME[gateway.scheme]:
        value = environ.get(name, "").strip()
        if value:
            return parse(value, name)
    return None


def bypassed(host, no_proxy):
    """Whether NO_PROXY (comma-separated, curl's rules) lets ``host`` be dialled directly."""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if _matches_address(host, entry):
            return True
        name = entry.lstrip(".").rstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _matches_address(host, entry):
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        return address in ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return False
