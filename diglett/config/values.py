"""What loading a config returns: the frozen ServerConfig and the SectionValues mappings.

This module owns the result types and how their reprs mask secrets (a secret key's value, the
password of a database URL), so a config can be logged or shown in a traceback safely. It must
not parse or read anything. ServerConfig is written out field by field so that an editor, grep
and a type checker can find ``cfg.listen``; tests/unit/test_config.py checks that its fields are
exactly the [server] keys of diglett.config.schema, in order, between ``path`` and ``sections``.
"""

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from diglett.config.schema import SERVER, secret_keys

MASK = "***"  # printed instead of a secret's value

Address = tuple[str, int]  # (host, port), as parsers.host_port returns it
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Seconds = int | float  # parsers.seconds keeps a whole number an int


class SectionValues(Mapping):
    """The parsed values of one section: a read-only mapping whose repr masks secrets."""

    def __init__(self, values, secrets=()):
        self._values = dict(values)
        self._secrets = frozenset(secrets)

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return "{%s}" % ", ".join(
            "%r: %s" % (key, shown(value, key in self._secrets))
            for key, value in self._values.items()
        )


@dataclass(frozen=True, repr=False)
class ServerConfig:
    """The server's config: one attribute per [server] key, parsed; `path` is the file;
    `sections` maps every other section to its values (a SectionValues)."""

    path: Path
    listen: Address
    http: Address
    domain: str
    bind: str
    ports: tuple[int, int] | None  # None: a random free port per tunnel
    proxy_trusted: tuple[Network, ...]
    key: Path
    database: Path | str  # a SQLite file, or a URL kept as written
    gateway_id: str
    gateway_stale_after: Seconds
    workers: int  # 1: one process, as before workers existed (diglett.workers)
    handshake_timeout: Seconds
    ping_interval: Seconds
    dead_after: Seconds
    max_streams: int
    stream_window: int  # bytes
    open_rate: int
    open_burst: int
    max_startups: tuple[int, int, int]  # (start, rate, full)
    per_source_startups: int
    penalty_max: Seconds
    memory_budget: int  # bytes
    ping_limit: int
    flood_limit: int
    write_stall_timeout: Seconds
    stream_idle_timeout: Seconds
    drain_timeout: Seconds
    restart_drain: Seconds
    hold_timeout: Seconds
    hold_max_visitors: int
    shutdown_timeout: Seconds
    log_level: str
    log_format: str
    audit_retention: Seconds
    token: str
    listen_tls: Address | None  # None: no TLS listener
    listen_ws: Address | None  # None: no WebSocket listener
    ws_path: str
    tls_cert: Path | None  # None: a self-signed certificate next to ``key``
    tls_key: Path | None
    sections: Mapping[str, SectionValues]

    def __repr__(self):
        secrets = secret_keys(SERVER)
        return "ServerConfig(%s)" % ", ".join(
            "%s=%s" % (field.name, shown(getattr(self, field.name), field.name in secrets))
            for field in dataclasses.fields(self)
        )


def shown(value, secret):
    """repr(value) for reprs, with secrets and URL passwords (a database URL's) masked."""
    if secret and value:
        return MASK
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            netloc = parts.netloc.replace(":%s@" % parts.password, ":%s@" % MASK, 1)
            return repr(parts._replace(netloc=netloc).geturl())
    return repr(value)
