"""What the registry hands out: frozen records, the words stored in them, and RegistryError.

This module owns the plain dataclasses every caller sees (Grant, SessionRow, GatewayRow,
AuditEntry, Delivery), the state and reason values written to the database, the one exception
and the default audit actor. It must not import peewee or open a database: readers of records
(the gateway, hooks, the CLI's printing) get them without the machinery that made them.
"""

import datetime
import os
import pwd
import time
from dataclasses import asdict, dataclass

from diglett import crypto
from diglett.policy import Policy

STATE_ACTIVE = "active"
STATE_ENDED = "ended"
REASON_STALE = "stale"  # session left active by a server process that is gone
LEGACY_GATEWAY = ""  # gateway of rows written before migration 0004 (one server per database)
DELIVERY_PENDING = "pending"
DELIVERY_DONE = "done"
DELIVERY_DEAD = "dead"  # gave up after too many attempts or too long


class RegistryError(Exception):
    """The registry cannot do what was asked; the message is meant for an operator."""


class InviteRefused(RegistryError):
    """An invite that cannot be redeemed (unknown, wrong secret, used, expired, another
    name); the message is meant for the agent's operator and names no secret."""


def iso_time(seconds):
    """UNIX seconds -> ISO 8601 UTC text (``2026-01-02T03:04:05.678Z``); None stays None."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Grant:
    """Permission for the agent holding ``key`` to serve ``subdomain``."""

    subdomain: str
    key: str  # 66 lowercase hex digits, compressed secp256k1
    port: int | None  # pinned tunnel port, or None for any
    comment: str
    created: float  # UNIX seconds
    policy: Policy = Policy()  # what Traefik does in front of the route (diglett.policy)

    def to_json(self):
        return {
            "subdomain": self.subdomain,
            "key": self.key,
            "fingerprint": crypto.fingerprint(self.key),
            "port": self.port,
            "comment": self.comment,
            "created": iso_time(self.created),
            "policy": self.policy.to_json(),
        }


@dataclass(frozen=True)
class InviteRow:
    """One enrolment invite as listed; its secret exists only in the printed code."""

    id: str  # 16 hex digits
    subdomain: str
    policy: Policy
    port: int | None
    comment: str
    actor: str
    created: float
    expires: float
    used: float | None
    used_by: str | None  # the agent key the grant was bound to

    def state(self, now):
        return "used" if self.used is not None else "expired" if now >= self.expires else "open"

    def to_json(self, now=None):
        data = asdict(self)
        data["policy"] = self.policy.to_json()
        for name in ("created", "expires", "used"):
            data[name] = iso_time(data[name])
        data["fingerprint"] = crypto.fingerprint(self.used_by) if self.used_by else None
        data["state"] = self.state(time.time() if now is None else now)
        return data


@dataclass(frozen=True)
class SessionRow:
    """One agent session as the server recorded it."""

    id: str  # 16 hex digits, chosen by the server
    subdomain: str
    key: str
    host: str  # tunnel listener address
    port: int
    remote: str  # the agent's "ip:port"
    started: float
    ended: float | None
    state: str  # STATE_ACTIVE or STATE_ENDED
    reason: str | None
    instance: str  # id of the server process that owns the session
    gateway: str = LEGACY_GATEWAY  # [server] gateway_id of that server

    def to_json(self):
        data = asdict(self)
        data["fingerprint"] = crypto.fingerprint(self.key)
        data["started"] = iso_time(self.started)
        data["ended"] = iso_time(self.ended)
        return data


@dataclass(frozen=True)
class GatewayRow:
    """One server sharing the registry, as it last reported itself."""

    gateway_id: str
    instance: str  # the running process (a new one after each restart)
    address: str  # its agent listener, "host:port"
    started: float
    last_seen: float
    sessions: int  # active sessions it holds

    def to_json(self):
        data = asdict(self)
        data["started"] = iso_time(self.started)
        data["last_seen"] = iso_time(self.last_seen)
        return data


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit trail: who did what to which name, and the details."""

    id: int
    time: float
    actor: str
    action: str  # grant, regrant, revoke, session-start, session-end, kick, hook-done, ...
    subdomain: str
    key: str | None
    detail: str

    def to_json(self):
        data = asdict(self)
        data["time"] = iso_time(self.time)
        return data


@dataclass(frozen=True)
class Delivery:
    """One event one hook still has to handle (the outbox), or has handled."""

    id: int
    hook: str
    event_id: str
    subdomain: str
    session: str
    kind: str  # "connect" or "disconnect"
    payload: dict  # the event as the hook receives it
    state: str  # DELIVERY_PENDING, DELIVERY_DONE or DELIVERY_DEAD
    attempts: int
    next_attempt: float
    last_error: str | None
    created: float

    def to_json(self):
        data = asdict(self)
        for name in ("next_attempt", "created"):
            data[name] = iso_time(data[name])
        return data


def default_actor():
    """The unix user running this process, for the audit log."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid=%d" % uid
