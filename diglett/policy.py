"""Access policy of one grant: aliases, mode, basic auth, an IP allow list, forward auth and
named Traefik middlewares; what it may hold, and the one place that checks it.

Every value here ends up inside a Traefik router rule or middleware, so the checks are strict
allow lists (never escaping): a host name is DNS letters, digits, hyphens and dots; a hash is
an htpasswd bcrypt or apr1 hash, never a password; a network is what ``ipaddress`` parses back
to the same text; a URL is http(s) without spaces, quotes or backticks. ``Policy.from_json``
checks again what it reads, so a hand-edited registry row cannot inject a rule either. This
module does no I/O.
"""

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, fields, replace

from diglett.names import MAX_DOMAIN_LEN, MAX_LABEL_LEN

MODES = ("http", "tcp")  # "" in a policy: the Traefik hook's own mode
MAX_ALIASES = 16  # extra host names of one route
MAX_USERS = 32  # basic-auth entries of one grant
MAX_NETWORKS = 64  # allow-list entries of one grant
MAX_MIDDLEWARES = 8  # named Traefik middlewares of one grant
MAX_URL_LEN = 2048  # characters of a forward-auth URL
MAX_USER_LEN = 64  # characters of a basic-auth user name

HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,%d}[a-z0-9])?" % (MAX_LABEL_LEN - 2))
USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,%d}" % MAX_USER_LEN)
# htpasswd -B (bcrypt, cost 04..31) and -m (apr1-MD5): the two hashes Traefik checks well.
BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
APR1_RE = re.compile(r"\$apr1\$[./A-Za-z0-9]{1,8}\$[./A-Za-z0-9]{22}")
# A Traefik middleware name, optionally qualified by its provider (auth@file).
MIDDLEWARE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62})(?:@[A-Za-z0-9_-]{1,32})?")
URL_FORBIDDEN = set(" \t\r\n`'\"\\<>{}|^")  # never needed in an auth URL; all rule-breakers
RESERVED_MIDDLEWARE_PREFIX = "diglett-"  # the hooks name their own middlewares so

OPTION_NAMES = {  # CLI option -> Policy field
    "alias": "aliases", "mode": "mode", "basic-auth": "basic_auth", "allow": "allow",
    "forward-auth": "forward_auth", "middleware": "middlewares",
}


class PolicyError(ValueError):
    """A policy value that may not be stored; the message names the value and the rule."""


def check_host(text):
    """A DNS host name (``www.customer.com``), lowercased; at least two labels."""
    host = str(text).lower().rstrip(".") if isinstance(text, str) else ""
    labels = host.split(".")
    if (not host or len(host) > MAX_DOMAIN_LEN or len(labels) < 2
            or not all(HOST_LABEL_RE.fullmatch(label) for label in labels)):
        raise PolicyError("alias %r is not a host name: use DNS labels of a-z, 0-9 and inner "
                          "'-', separated by dots, like www.customer.com" % (text,))
    return host


def check_mode(text):
    if text not in MODES + ("",):
        raise PolicyError("mode must be http or tcp, got %r" % (text,))
    return text


def check_basic_auth(text):
    """``user:HASH`` with an htpasswd bcrypt ($2y$) or apr1 ($apr1$) hash."""
    user, colon, hashed = str(text).partition(":")
    if not colon or not USER_RE.fullmatch(user):
        raise PolicyError("basic-auth must be USER:HASH with a user of letters, digits and "
                          "._@- (at most %d), got %r" % (MAX_USER_LEN, _short(text)))
    if not (BCRYPT_RE.fullmatch(hashed) or APR1_RE.fullmatch(hashed)):
        raise PolicyError("basic-auth for %s: %r is not an htpasswd bcrypt ($2y$...) or apr1 "
                          "($apr1$...) hash; make one with `htpasswd -nB %s` (plain passwords "
                          "are never stored)" % (user, _short(hashed), user))
    return "%s:%s" % (user, hashed)


def check_network(text):
    """An address or network in canonical form (``203.0.113.0/24``, ``2001:db8::/32``)."""
    try:
        network = ipaddress.ip_network(str(text), strict=True)
    except ValueError as exc:
        raise PolicyError("allow %r is not an IP address or network (CIDR): %s"
                          % (_short(text), exc)) from None
    return str(network)


def check_url(text):
    """An http(s) URL of a forward-auth server (oauth2-proxy, Authelia, Authentik)."""
    text = str(text)
    bad = sorted(set(text) & URL_FORBIDDEN)
    parts = urllib.parse.urlsplit(text) if not bad and len(text) <= MAX_URL_LEN else None
    try:
        port_ok = parts is not None and (parts.port or 1) > 0
    except ValueError:
        port_ok = False
    if (not port_ok or parts.scheme not in ("http", "https") or not parts.hostname
            or not text.isprintable() or not text.isascii()):
        raise PolicyError("forward-auth %r is not an http:// or https:// URL with a host (at "
                          "most %d characters, no spaces or quotes)" % (_short(text),
                                                                       MAX_URL_LEN))
    return text


def check_middleware(text):
    text = str(text)
    if not MIDDLEWARE_RE.fullmatch(text) or text.startswith(RESERVED_MIDDLEWARE_PREFIX):
        raise PolicyError("middleware %r is not a Traefik middleware name (letters, digits, "
                          "._-, optionally @provider; not starting with %r)"
                          % (_short(text), RESERVED_MIDDLEWARE_PREFIX))
    return text


def check_outside(aliases, domain):
    """An alias inside the tunnel domain would take another name's route: refused."""
    domain = (domain or "").lower()
    for alias in aliases:
        host = check_host(alias)
        if domain and (host == domain or host.endswith("." + domain)):
            raise PolicyError("alias %s is inside the tunnel domain %s; it would take another "
                              "name's route (aliases are for other domains)" % (host, domain))


_LISTS = {  # field -> (check of one item, most items)
    "aliases": (check_host, MAX_ALIASES),
    "basic_auth": (check_basic_auth, MAX_USERS),
    "allow": (check_network, MAX_NETWORKS),
    "middlewares": (check_middleware, MAX_MIDDLEWARES),
}
_SINGLE = {"mode": check_mode, "forward_auth": lambda text: check_url(text) if text else ""}


@dataclass(frozen=True)
class Policy:
    """What Traefik does in front of one grant's route; the empty Policy changes nothing."""

    aliases: tuple = ()  # more host names routed to the same tunnel
    mode: str = ""  # "http", "tcp", or "" for the hook's mode
    basic_auth: tuple = ()  # "user:HASH" entries
    allow: tuple = ()  # source networks; empty: every source
    forward_auth: str = ""  # URL asked about every request; empty: none
    middlewares: tuple = ()  # existing Traefik middlewares, by name

    def __post_init__(self):
        for name, (check, most) in _LISTS.items():
            items = getattr(self, name)
            if isinstance(items, str) or not isinstance(items, (list, tuple)):
                raise PolicyError("%s must be a list, got %r" % (name, items))
            checked = tuple(dict.fromkeys(check(item) for item in items))  # drop repeats
            if len(checked) > most:
                raise PolicyError("at most %d %s per grant, got %d" % (most, name, len(checked)))
            object.__setattr__(self, name, checked)
        for name, check in _SINGLE.items():
            object.__setattr__(self, name, check(getattr(self, name) or ""))
        if self.mode == "tcp" and self.http_only():
            raise PolicyError("mode tcp passes TLS through untouched, so %s cannot apply; "
                              "use mode http or drop them" % ", ".join(self.http_only()))

    def http_only(self):
        """The options that need an HTTP route (Traefik cannot apply them to raw TCP)."""
        return [option for option, name in OPTION_NAMES.items()
                if name in ("basic_auth", "forward_auth", "middlewares") and getattr(self, name)]

    def updated(self, changes=None, clear=()):
        """A copy with ``changes`` ({field: value}) set and the fields in ``clear`` emptied."""
        values = {name: _empty(name) for name in clear}
        values.update(changes or {})
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise PolicyError("unknown policy option(s): %s" % ", ".join(sorted(unknown)))
        return replace(self, **values)

    def to_json(self):
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    @classmethod
    def from_json(cls, data):
        """Checked again: a row edited by hand fails here, before anything is rendered."""
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise PolicyError("a policy is a JSON object, got %r" % (data,))
        return cls().updated({name: tuple(value) if isinstance(value, list) else value
                              for name, value in data.items()})

    def summary(self):
        """One short line for `diglett-admin grants`; "-" when there is no policy."""
        parts = ["mode=" + self.mode] if self.mode else []
        parts += ["alias=" + a for a in self.aliases]
        parts += ["auth=" + entry.split(":", 1)[0] for entry in self.basic_auth]
        parts += ["allow=" + network for network in self.allow]
        parts += ["forward-auth=" + self.forward_auth] if self.forward_auth else []
        parts += ["middleware=" + name for name in self.middlewares]
        return " ".join(parts) or "-"


def _empty(name):
    return () if name in _LISTS else ""


def _short(text):
    text = str(text)
    return text if len(text) <= 80 else text[:77] + "..."
