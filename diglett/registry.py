"""The registry: grants, sessions, gateways and the audit log in SQLite or PostgreSQL.

This module owns the peewee models, the schema migrations runner and a small synchronous API
that returns plain frozen dataclasses; no peewee object leaves it. It must not import gevent
or know about sockets: the server calls it from one dedicated OS thread (gevent's threadpool),
because a SQLite call, and a psycopg2 call just as much, blocks the thread that makes it
(style habit 8, security.md 5.5); diglett-admin calls it directly. Every database failure
leaves as a RegistryError whose message names the database and says what to do.

One registry may be shared by several servers ("gateways", each with its own
``[server] gateway_id``) when it lives in PostgreSQL: grants are shared, while sessions, hook
deliveries and kicks carry the gateway that owns them, and the ``gateways`` table says which
gateways are alive (each refreshes its row every few seconds).
"""

import contextlib
import datetime
import importlib
import json
import logging
import os
import pkgutil
import pwd
import re
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import peewee
from playhouse import db_url

import diglett.migrations
from diglett import crypto, names

log = logging.getLogger(__name__)

BUSY_TIMEOUT = 0.05  # seconds SQLite waits for another connection's lock before giving up
RETRY_DELAYS = (0.02, 0.05, 0.1)  # seconds slept between attempts while the database is locked
SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),  # readers never wait for the writer
    ("synchronous", "normal"),  # safe with WAL; a power cut loses at most the last commits
    ("foreign_keys", 1),
)
MIGRATION_RE = re.compile(r"(\d{4})_([a-z0-9_]+)")  # migrations/NNNN_name.py
IN_CHUNK = 500  # values in one SQL IN (...) list; old SQLite allows 999 parameters
MAX_COMMENT_LEN = 200  # characters in a grant comment; one line in `diglett-admin grants`
PORT_RANGE = (1, 65535)

STATE_ACTIVE = "active"
STATE_ENDED = "ended"
REASON_STALE = "stale"  # session left active by a server process that is gone
LEGACY_GATEWAY = ""  # gateway of rows written before migration 0004 (one server per database)
PG_CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL before the attempt is reported
PG_STATEMENT_TIMEOUT = "30s"  # a statement stuck on a lock longer than this fails (and is retried)
PG_MIGRATION_LOCK = 0x646967  # advisory lock id: one gateway at a time applies migrations
PG_FIELD_TYPES = {"FLOAT": "DOUBLE PRECISION"}  # peewee's default REAL would round timestamps
DELIVERY_PENDING = "pending"
DELIVERY_DONE = "done"
DELIVERY_DEAD = "dead"  # gave up after too many attempts or too long


class RegistryError(Exception):
    """The registry cannot do what was asked; the message is meant for an operator."""


# --- what callers see -------------------------------------------------------------------


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

    def to_json(self):
        return {
            "subdomain": self.subdomain,
            "key": self.key,
            "fingerprint": crypto.fingerprint(self.key),
            "port": self.port,
            "comment": self.comment,
            "created": iso_time(self.created),
        }


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


# --- models (current schema; migrations/ holds frozen copies) -----------------------------


class _Base(peewee.Model):
    class Meta:
        legacy_table_names = False


class GrantModel(_Base):
    subdomain = peewee.CharField(max_length=63)
    key = peewee.CharField(max_length=66)
    port = peewee.IntegerField(null=True, unique=True)  # NULLs do not collide
    comment = peewee.TextField(default="")
    created = peewee.FloatField()

    class Meta:
        table_name = "grants"
        indexes = ((("subdomain", "key"), True),)


class SessionModel(_Base):
    id = peewee.CharField(max_length=32, primary_key=True)
    subdomain = peewee.CharField(max_length=63)
    key = peewee.CharField(max_length=66)
    host = peewee.TextField()
    port = peewee.IntegerField()
    remote = peewee.TextField()
    started = peewee.FloatField()
    ended = peewee.FloatField(null=True)
    state = peewee.CharField(max_length=16, index=True)
    reason = peewee.TextField(null=True)
    instance = peewee.TextField()
    gateway = peewee.CharField(max_length=63, default=LEGACY_GATEWAY, index=True)

    class Meta:
        table_name = "sessions"
        indexes = ((("subdomain", "started"), False),)  # last_port()


class AuditLogModel(_Base):
    time = peewee.FloatField()
    actor = peewee.TextField()
    action = peewee.CharField(max_length=32)
    subdomain = peewee.CharField(max_length=63)
    key = peewee.CharField(max_length=66, null=True)  # None: revoke of every key
    detail = peewee.TextField(default="")

    class Meta:
        table_name = "audit_log"


class SchemaVersionModel(_Base):
    """Bookkeeping of the migrations runner itself, so it is not a migration."""

    version = peewee.IntegerField(primary_key=True)
    name = peewee.TextField()
    applied = peewee.FloatField()

    class Meta:
        table_name = "schema_version"


class OutboxModel(_Base):
    """Hook deliveries, written in the transaction of the session change that caused them."""

    hook = peewee.CharField(max_length=64)
    event_id = peewee.CharField(max_length=32)
    subdomain = peewee.CharField(max_length=63)
    session = peewee.CharField(max_length=32)
    kind = peewee.CharField(max_length=16)
    payload = peewee.TextField()  # JSON
    state = peewee.CharField(max_length=16)
    attempts = peewee.IntegerField(default=0)
    next_attempt = peewee.FloatField()
    last_error = peewee.TextField(null=True)
    created = peewee.FloatField()
    gateway = peewee.CharField(max_length=63, default=LEGACY_GATEWAY)  # whose hooks deliver it

    class Meta:
        table_name = "outbox"
        indexes = ((("hook", "state", "id"), False),)


class KickModel(_Base):
    """`diglett-admin kick` requests; the server polls them as it polls the grants."""

    subdomain = peewee.CharField(max_length=63)
    delay = peewee.IntegerField()  # seconds the kicked agent waits before reconnecting
    actor = peewee.TextField()
    requested = peewee.FloatField()
    handled = peewee.FloatField(null=True)
    result = peewee.TextField(null=True)
    gateway = peewee.CharField(max_length=63, null=True)  # holder of the session; None: any

    class Meta:
        table_name = "kicks"


class GatewayModel(_Base):
    """The servers sharing this registry; each refreshes ``last_seen`` every few seconds."""

    gateway_id = peewee.CharField(max_length=63, primary_key=True)
    instance = peewee.TextField()
    address = peewee.TextField()
    started = peewee.FloatField()
    last_seen = peewee.FloatField()

    class Meta:
        table_name = "gateways"


MODELS = (GrantModel, SessionModel, AuditLogModel, OutboxModel, KickModel,
          GatewayModel)  # the migrations


def _bind(model, db):
    """A subclass of ``model`` bound to ``db``, so two registries never share a binding."""
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    return type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})


def migration_names():
    """(number, module name) of every migrations/NNNN_name.py, in order."""
    found = []
    for info in pkgutil.iter_modules(diglett.migrations.__path__):
        match = MIGRATION_RE.fullmatch(info.name)
        if match:
            found.append((int(match.group(1)), info.name))
    found.sort()
    numbers = [number for number, _ in found]
    if len(set(numbers)) != len(numbers):
        raise RegistryError("two migrations share a number in %s" % diglett.migrations.__path__)
    return found


def default_actor():
    """The unix user running this process, for the audit log."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid=%d" % uid


# --- the API -------------------------------------------------------------------------------


class Registry:
    """Grants and sessions in one database; every method is synchronous and thread-agnostic.

    Each thread gets its own connection (peewee ``thread_safe``). A locked SQLite database is
    retried a few times with short sleeps (never longer than about 0.4 s in total) and then
    reported, so a stuck writer elsewhere cannot freeze the caller.
    """

    def __init__(self, database, *, migrate=True, create_dirs=False):
        self.location = _display(database)
        self.db, self.path = _open(database)
        if self.path is not None and create_dirs:
            self._make_parent()
        self._is_sqlite = isinstance(self.db, peewee.SqliteDatabase)
        self._grants = _bind(GrantModel, self.db)
        self._sessions = _bind(SessionModel, self.db)
        self._audit = _bind(AuditLogModel, self.db)
        self._versions = _bind(SchemaVersionModel, self.db)
        self._outbox = _bind(OutboxModel, self.db)
        self._kicks = _bind(KickModel, self.db)
        self._gateways = _bind(GatewayModel, self.db)
        self._writes = 0  # bumped after each own commit: invalidates the grant snapshot cache
        self._local = threading.local()  # per-connection snapshot cache (like peewee's state)
        if migrate:
            self.migrate()

    def close(self):
        """Close the calling thread's connection."""
        if not self.db.is_closed():
            self.db.close()

    def __repr__(self):
        return "<Registry %s>" % self.location

    # -- schema

    def migrate(self):
        """Apply missing migrations in order, each in its own transaction; return their names."""
        applied = []
        self._call(self._migrate, applied)
        return applied

    def schema_version(self):
        return self._call(self._current_version)

    # -- grants

    def grant(self, subdomain, key, port=None, comment="", actor=None):
        """Create or update the grant (subdomain, key); returns it."""
        subdomain = names.validate_subdomain(subdomain)
        key = crypto.normalize_public_key(key)
        _check_port(port)
        _check_comment(comment)
        actor = actor or default_actor()
        return self._call(self._grant, subdomain, key, port, comment or "", actor)

    def revoke(self, subdomain, key=None, actor=None):
        """Remove the grant of ``subdomain`` to ``key`` (or to every key); returns how many."""
        subdomain = names.validate_subdomain(subdomain)
        if key is not None:
            key = crypto.normalize_public_key(key)
        return self._call(self._revoke, subdomain, key, actor or default_actor())

    def grants(self):
        model = self._grants
        query = model.select().order_by(model.subdomain, model.key)
        return self._call(lambda: [_grant_of(row) for row in query])

    def find_grant(self, subdomain, key):
        subdomain = names.validate_subdomain(subdomain)
        key = crypto.normalize_public_key(key)
        model = self._grants
        where = (model.subdomain == subdomain) & (model.key == key)
        row = self._call(lambda: model.get_or_none(where))
        return None if row is None else _grant_of(row)

    def grant_snapshot(self):
        """{(subdomain, key): Grant} of every grant; cheap enough to call every second.

        With SQLite, ``PRAGMA data_version`` tells whether another connection committed since
        the last call; if not (and we wrote nothing), the cached snapshot is returned.
        """
        return dict(self._call(self._snapshot))

    # -- sessions

    def record_session_start(self, row, deliveries=()):
        """Record a new session and its hook deliveries; False if its id is already recorded.

        ``deliveries`` are (hook, event dict) pairs, written in the same transaction, so a
        crash a moment later loses no hook's work. Idempotent, because the server retries a
        failed write until it succeeds, and a write that failed after its commit must not
        turn into an error forever.
        """
        return self._call(self._insert_session, row, deliveries)

    def record_session_end(self, session_id, reason, ended, deliveries=(), detail=""):
        """Mark an active session ended (with its deliveries); False if it was not active.

        ``detail`` (e.g. bytes and streams) goes into the audit entry of the end.
        """
        return self._call(self._end_session, session_id, reason, ended, deliveries, detail)

    def active_sessions(self, gateway=None):
        """Active sessions, oldest first: every gateway's, or only ``gateway``'s."""
        model = self._sessions
        where = model.state == STATE_ACTIVE
        if gateway is not None:
            where &= model.gateway == gateway
        query = model.select().where(where).order_by(model.started)
        return self._call(lambda: [_session_of(row) for row in query])

    def active_sessions_of(self, subdomains):
        """Active sessions of these names on any gateway (the takeover check's question)."""
        names_ = sorted(set(subdomains))
        model = self._sessions

        def select():
            found = []
            for start in range(0, len(names_), IN_CHUNK):
                where = (model.state == STATE_ACTIVE) & model.subdomain.in_(
                    names_[start:start + IN_CHUNK])
                found += [_session_of(row) for row in model.select().where(where)]
            return found

        return self._call(select)

    def end_stale_sessions(self, instance, deliveries_of=None, gateway=LEGACY_GATEWAY):
        """End (reason 'stale') active sessions of ``gateway`` owned by another server
        instance, i.e. left by this gateway's previous run; return them.

        Other gateways' sessions are never touched. ``deliveries_of(row)`` gives the (hook,
        event dict) pairs to queue for each, in the same transaction.
        """
        model = self._sessions
        where = ((model.state == STATE_ACTIVE) & (model.gateway == gateway)
                 & (model.instance != instance))
        return self._call(self._end_stale, where, deliveries_of or (lambda row: ()), None)

    def end_sessions_of_dead_gateways(self, gateway, stale_after, deliveries_of=None):
        """End (reason 'stale') active sessions of gateways not seen for ``stale_after``
        seconds (and rows older than gateways); ``gateway``, the caller, is never one of them.

        The deliveries are queued for the caller's hooks: the dead gateway cannot run its own.
        """
        model, seen = self._sessions, self._gateways
        alive = seen.select(seen.gateway_id).where(seen.last_seen >= time.time() - stale_after)
        where = ((model.state == STATE_ACTIVE) & (model.gateway != gateway)
                 & model.gateway.not_in(alive))
        return self._call(self._end_stale, where, deliveries_of or (lambda row: ()), gateway)

    # -- gateways (servers sharing this registry)

    def gateway_seen(self, gateway, instance, address):
        """Refresh ``gateway``'s row; returns the instance that held it before (None: new).

        Another instance there while this one runs means two servers share a gateway_id.
        """
        return self._call(self._gateway_seen, gateway, instance, address)

    def gateways(self):
        """Every gateway that ever used this registry, with its active session count."""
        seen, model = self._gateways, self._sessions
        counts = (model.select(model.gateway, peewee.fn.COUNT(model.id).alias("n"))
                  .where(model.state == STATE_ACTIVE).group_by(model.gateway))

        def select():
            held = {row.gateway: row.n for row in counts}
            return [GatewayRow(row.gateway_id, row.instance, row.address, row.started,
                               row.last_seen, held.get(row.gateway_id, 0))
                    for row in seen.select().order_by(seen.gateway_id)]

        return self._call(select)

    # -- kicks (diglett-admin kick -> the running server)

    def request_kick(self, subdomain, delay, actor=None):
        """Ask the running server to end the session of ``subdomain``; returns the request id.

        The request is addressed to the gateway holding the session, or to any when none does.
        """
        subdomain = names.validate_subdomain(subdomain)
        actor = actor or default_actor()
        model = self._sessions

        def insert():
            with self._write():
                holder = (model.select(model.gateway)
                          .where((model.subdomain == subdomain) & (model.state == STATE_ACTIVE))
                          .order_by(model.started.desc()).limit(1).scalar())
                row = self._kicks.create(subdomain=subdomain, delay=int(delay), actor=actor,
                                         requested=time.time(), gateway=holder)
                self._log(actor, "kick-request", subdomain, None, "delay=%d" % delay)
            return row.id

        return self._call(insert)

    def pending_kicks(self, gateway=None):
        """Unanswered kicks: every one, or those for ``gateway`` and those for any gateway."""
        model = self._kicks
        where = model.handled.is_null()
        if gateway is not None:
            where &= (model.gateway == gateway) | model.gateway.is_null()
        query = model.select().where(where).order_by(model.id)
        return self._call(lambda: [(row.id, row.subdomain, row.delay, row.actor) for row in query])

    def kick_handled(self, kick_id, result):
        """Answer a kick; the first answer wins when several gateways saw it."""
        model = self._kicks
        query = model.update(handled=time.time(), result=result).where(
            (model.id == kick_id) & model.handled.is_null())
        self._call(self._write_query, query)

    def kick_result(self, kick_id):
        """The server's answer to a kick request, or None while it is pending."""
        row = self._call(lambda: self._kicks.get_or_none(self._kicks.id == kick_id))
        return None if row is None or row.handled is None else row.result

    def cancel_kick(self, kick_id):
        query = self._kicks.delete().where((self._kicks.id == kick_id)
                                           & self._kicks.handled.is_null())
        return self._call(self._write_query, query)

    # -- the audit trail

    def audit(self, action, subdomain, key=None, detail="", actor=None):
        """Append one audit entry (the server calls this for hook outcomes and kicks)."""
        def insert():
            with self._write():
                self._log(actor or default_actor(), action, subdomain, key, detail)

        self._call(insert)

    def audit_entries(self, since=None, subdomain=None, limit=1000):
        """Newest first."""
        model = self._audit
        query = model.select().order_by(model.id.desc()).limit(limit)
        if since is not None:
            query = query.where(model.time >= since)
        if subdomain is not None:
            query = query.where(model.subdomain == subdomain)
        return self._call(lambda: [AuditEntry(r.id, r.time, r.actor, r.action, r.subdomain, r.key,
                                              r.detail) for r in query])

    def prune_audit(self, before):
        """Forget audit entries older than ``before`` (UNIX seconds); returns how many."""
        query = self._audit.delete().where(self._audit.time < before)
        return self._call(self._write_query, query)

    # -- the hook outbox

    def pending_deliveries(self, hook, limit=500, gateway=None):
        """The oldest pending deliveries of ``hook``, in the order they were queued.

        With ``gateway``, only that gateway's (and rows from before gateways existed): each
        server's hooks deliver what its own sessions caused.
        """
        model = self._outbox
        where = (model.hook == hook) & (model.state == DELIVERY_PENDING)
        if gateway is not None:
            where &= model.gateway.in_((gateway, LEGACY_GATEWAY))
        query = model.select().where(where).order_by(model.id).limit(limit)
        return self._call(lambda: [_delivery_of(row) for row in query])

    def deliveries(self, state=None, limit=1000):
        """Newest first, for operators."""
        model = self._outbox
        query = model.select().order_by(model.id.desc()).limit(limit)
        if state is not None:
            query = query.where(model.state == state)
        return self._call(lambda: [_delivery_of(row) for row in query])

    def delivery_done(self, delivery_id):
        """The hook handled it; the audit trail says so."""
        self._call(self._settle, delivery_id, {"state": DELIVERY_DONE}, "hook-done")

    def delivery_failed(self, delivery_id, attempts, next_attempt, error, dead=False):
        """Record a failed attempt: retry at ``next_attempt``, or give up when ``dead``.

        The audit trail gets the first failure and the death, not every retry.
        """
        changes = {"attempts": attempts, "next_attempt": next_attempt,
                   "last_error": error[:2000], "state": DELIVERY_DEAD if dead else DELIVERY_PENDING}
        action = "hook-dead" if dead else "hook-failed" if attempts == 1 else None
        self._call(self._settle, delivery_id, changes, action, error)

    def prune_deliveries(self, before):
        """Forget finished deliveries created before ``before`` (UNIX seconds)."""
        model = self._outbox
        query = model.delete().where((model.state != DELIVERY_PENDING) & (model.created < before))
        return self._call(self._write_query, query)

    def last_port(self, subdomain):
        """The tunnel port of the latest session of ``subdomain``, or None."""
        subdomain = names.validate_subdomain(subdomain)
        model = self._sessions
        query = (
            model.select(model.port)
            .where(model.subdomain == subdomain)
            .order_by(model.started.desc())
            .limit(1)
        )
        return self._call(lambda: query.scalar())

    def last_ports(self, gateway=None):
        """{subdomain: tunnel port of its latest session}: a restarted server hands it back.

        With ``gateway``, only that gateway's sessions count (another host's ports mean
        nothing here).
        """
        model = self._sessions
        latest = model.select(model.subdomain, peewee.fn.MAX(model.started).alias("started"))
        query = model.select(model.subdomain, model.port)
        if gateway is not None:
            latest = latest.where(model.gateway == gateway)
            query = query.where(model.gateway == gateway)
        latest = latest.group_by(model.subdomain).alias("latest")
        query = query.join(latest, on=((model.subdomain == latest.c.subdomain)
                                       & (model.started == latest.c.started)))
        return self._call(lambda: {row.subdomain: row.port for row in query})

    # -- implementation: each runs inside _call, which retries and translates errors

    @contextlib.contextmanager
    def _write(self):
        """A write transaction; SQLite takes the write lock up front (no upgrade deadlock).

        On a full disk (and some I/O errors) SQLite rolls the transaction back by itself, so
        the rollback that follows fails with "no transaction is active"; that second error
        must not hide the first, which is the one that says what is wrong.
        """
        transaction = self.db.atomic("IMMEDIATE") if self._is_sqlite else self.db.atomic()
        transaction.__enter__()
        try:
            yield
        except BaseException as exc:
            with _first_error_wins():
                transaction.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with _first_error_wins():  # a failed COMMIT is rolled back too
            transaction.__exit__(None, None, None)

    def _migrate(self, applied):
        if self._is_sqlite:  # SQLite's IMMEDIATE transactions already take turns
            return self._apply_migrations(applied)
        self.db.execute_sql("SELECT pg_advisory_lock(%s)", (PG_MIGRATION_LOCK,))
        try:  # gateways starting together: one migrates, the others then find nothing to do
            return self._apply_migrations(applied)
        finally:
            self.db.execute_sql("SELECT pg_advisory_unlock(%s)", (PG_MIGRATION_LOCK,))

    def _apply_migrations(self, applied):
        known = migration_names()
        self._versions.create_table(safe=True)
        self._refuse_newer_schema(known)
        for number, name in known:
            with self._write():
                if self._versions.get_or_none(self._versions.version == number):
                    continue  # another process applied it meanwhile
                module = importlib.import_module("%s.%s" % (diglett.migrations.__name__, name))
                module.up(self.db)
                self._versions.create(version=number, name=name, applied=time.time())
            self._writes += 1
            log.info("applied migration %s to %s", name, self.location)
            applied.append(name)

    def _refuse_newer_schema(self, known):
        current = self._current_version()
        latest = known[-1][0] if known else 0
        if current > latest:
            raise RegistryError(
                "%s has schema version %d but this diglett knows only up to %d; "
                "upgrade diglett on this machine" % (self.location, current, latest)
            )

    def _current_version(self):
        if not self._versions.table_exists():
            return 0
        return self._versions.select(peewee.fn.MAX(self._versions.version)).scalar() or 0

    def _grant(self, subdomain, key, port, comment, actor):
        model = self._grants
        this = (model.subdomain == subdomain) & (model.key == key)
        with self._write():
            if port is not None:
                holder = model.get_or_none((model.port == port) & ~this)
                if holder is not None:
                    raise RegistryError(
                        "port %d is already pinned to %s (key %s); choose another port "
                        "or revoke that grant first"
                        % (port, holder.subdomain, crypto.fingerprint(holder.key))
                    )
            row = model.get_or_none(this)
            if row is None:
                action = "grant"
                row = model.create(
                    subdomain=subdomain, key=key, port=port, comment=comment, created=time.time()
                )
            else:
                action = "regrant"
                row.port, row.comment = port, comment
                row.save()
            self._log(actor, action, subdomain, key, "port=%s comment=%r" % (port, comment))
        self._writes += 1
        return _grant_of(row)

    def _revoke(self, subdomain, key, actor):
        model = self._grants
        where = model.subdomain == subdomain
        if key is not None:
            where &= model.key == key
        with self._write():
            count = model.delete().where(where).execute()
            if count:
                self._log(actor, "revoke", subdomain, key, "removed=%d" % count)
        self._writes += 1
        return count

    def _log(self, actor, action, subdomain, key, detail):
        self._audit.create(
            time=time.time(), actor=actor, action=action, subdomain=subdomain, key=key,
            detail=detail,
        )

    def _snapshot(self):
        cache = getattr(self._local, "snapshot", None)
        stamp = self._stamp()
        if cache is not None and stamp is not None and cache[0] == stamp:
            return cache[1]
        grants = {(g.subdomain, g.key): g for g in map(_grant_of, self._grants.select())}
        self._local.snapshot = (stamp, grants)
        return grants

    def _stamp(self):
        """What changes whenever the grants may have changed; None when unknown."""
        if not self._is_sqlite:
            return None
        # data_version is per connection: a new connection (after close()) may restart its
        # count, so the connection itself is part of the stamp.
        connection = self.db.connection()
        data_version = connection.execute("PRAGMA data_version").fetchone()[0]
        return (connection, data_version, self._writes)

    def _insert_session(self, row, deliveries):
        fields = asdict(row)
        with self._write():
            existing = self._sessions.get_or_none(self._sessions.id == row.id)
            if existing is None:
                self._sessions.insert(**fields).execute()
                self._queue(row, deliveries)
                self._log("server", "session-start", row.subdomain, row.key,
                          "session=%s remote=%s port=%d" % (row.id, row.remote, row.port))
        if existing is not None and _session_of(existing) != row:
            log.warning("session %s is already recorded in %s with other values; kept the "
                        "first", row.id, self.location)
        return existing is None

    def _write_query(self, query):
        with self._write():
            return query.execute()

    def _end_session(self, session_id, reason, ended, deliveries, detail):
        model = self._sessions
        with self._write():
            row = model.get_or_none((model.id == session_id) & (model.state == STATE_ACTIVE))
            if row is None:
                return False
            model.update(state=STATE_ENDED, reason=reason, ended=ended).where(
                model.id == session_id).execute()
            self._queue(_session_of(row), deliveries)
            self._log("server", "session-end", row.subdomain, row.key,
                      " ".join(filter(None, ("session=%s remote=%s reason=%s duration=%.0f"
                                             % (row.id, row.remote, reason, ended - row.started),
                                             detail))))
        return True

    def _gateway_seen(self, gateway, instance, address):
        model = self._gateways
        now = time.time()
        with self._write():
            row = model.get_or_none(model.gateway_id == gateway)
            if row is None:
                model.create(gateway_id=gateway, instance=instance, address=address,
                             started=now, last_seen=now)
                return None
            changes = {"instance": instance, "address": address, "last_seen": now}
            if row.instance != instance:
                changes["started"] = now
            model.update(**changes).where(model.gateway_id == gateway).execute()
        return row.instance

    def _end_stale(self, where, deliveries_of, gateway):
        model = self._sessions
        now = time.time()
        with self._write():
            rows = [_ended(_session_of(row), now) for row in model.select().where(where)]
            ids = [row.id for row in rows]
            if ids:
                model.update(state=STATE_ENDED, reason=REASON_STALE, ended=now).where(
                    model.id.in_(ids)
                ).execute()
            for row in rows:
                self._queue(row, deliveries_of(row), gateway)
                self._log("server", "session-end", row.subdomain, row.key,
                          "session=%s remote=%s reason=%s gateway=%s"
                          % (row.id, row.remote, REASON_STALE, row.gateway))
        return rows

    def _settle(self, delivery_id, changes, action, error=""):
        model = self._outbox
        with self._write():
            model.update(**changes).where(model.id == delivery_id).execute()
            row = model.get_or_none(model.id == delivery_id)
            if action is not None and row is not None:
                detail = "hook=%s event=%s event_id=%s attempts=%d" % (
                    row.hook, row.kind, row.event_id, row.attempts)
                self._log("server", action, row.subdomain, None,
                          detail + (" error=%s" % error[:300] if error else ""))

    def _queue(self, row, deliveries, gateway=None):
        """Outbox rows for the hooks of ``gateway`` (default: the session's own gateway)."""
        now = time.time()
        for hook, event in deliveries:
            self._outbox.insert(
                hook=hook, event_id=event["event_id"], subdomain=row.subdomain, session=row.id,
                kind=event["kind"], payload=json.dumps(event), state=DELIVERY_PENDING,
                next_attempt=now, created=now, gateway=row.gateway if gateway is None else gateway,
            ).execute()

    # -- retries and error translation

    def _call(self, function, *args):
        delays = iter(RETRY_DELAYS)
        reconnected = False
        while True:
            try:
                return function(*args)
            except RegistryError:
                raise
            except (peewee.PeeweeException, sqlite3.Error, OSError) as exc:
                if not reconnected and self._forget_broken_connection():
                    reconnected = True  # PostgreSQL restarted: one fresh connection, at once
                    log.info("lost the connection to %s; reconnecting", self.location)
                    continue
                delay = next(delays, None) if _is_busy(exc) else None
                if delay is None:
                    raise RegistryError(self._explain(exc)) from exc
                log.debug("%s is locked, retrying in %.2f s", self.location, delay)
                time.sleep(delay)

    def _forget_broken_connection(self):
        """Drop this thread's PostgreSQL connection if the server closed it; True if so.

        peewee would otherwise keep handing out the dead connection.
        """
        if self._is_sqlite:
            return False
        connection = self.db._state.conn
        if connection is None or not getattr(connection, "closed", 0):
            return False
        self.db._state.reset()
        return True

    def _explain(self, exc):
        if not self._is_sqlite and not isinstance(exc, OSError):
            return _explain_postgres(exc, self.location)
        text = str(exc)
        lower = text.lower()
        where = self.location
        user = default_actor()
        if _is_busy(exc):
            return (
                "%s is locked by another process (gave up after %.1f s); try again, and look "
                "for a stuck diglett-admin or sqlite3 shell holding a transaction"
                % (where, BUSY_TIMEOUT * (len(RETRY_DELAYS) + 1) + sum(RETRY_DELAYS))
            )
        if "readonly" in lower or "read-only" in lower:
            return (
                "%s is read-only for user %s; the database file, its -wal/-shm files and "
                "its directory must be writable by the user running diglett (check `ls -l`; "
                "run diglett-admin as the service user)" % (where, user)
            )
        if "unable to open" in lower and self.path is not None:
            parent = self.path.parent
            if not parent.is_dir():
                return (
                    "cannot open %s: directory %s does not exist; create it (diglett-admin "
                    "creates it on first use) or fix `database` in the config" % (where, parent)
                )
            return (
                "cannot open %s as user %s: check the owner and permissions of the file, "
                "its -wal/-shm files and directory %s" % (where, user, parent)
            )
        if "disk" in lower and "full" in lower:
            return "the disk holding %s is full; free some space and try again" % where
        if "not a database" in lower or "malformed" in lower:
            return "%s is not a usable SQLite database (%s); restore it from a backup" % (
                where, text)
        if "no such table" in lower:
            return "%s has no diglett schema (%s); run: diglett-admin migrate" % (where, text)
        if isinstance(exc, OSError):
            return "cannot use %s: %s" % (where, exc.strerror or exc)
        return "database error on %s: %s" % (where, text)

    def _make_parent(self):
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise RegistryError(
                "cannot create directory %s for %s: %s" % (parent, self.location, exc.strerror)
            ) from exc


# --- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _first_error_wins():
    """A rollback that fails because SQLite already rolled back gives way to the error that
    made it roll back (its context): "database or disk is full", not "no transaction"."""
    try:
        yield
    except (peewee.PeeweeException, sqlite3.Error) as exc:
        cause = exc
        while cause is not None and "no transaction is active" in str(cause):
            cause = cause.__context__  # peewee wraps sqlite3's error: look past both
        if cause is None or cause is exc:
            raise
        raise cause from None


def _open(database):
    """peewee database for a path or URL, and the SQLite file path if there is one."""
    text = str(database)
    sqlite_options = {"pragmas": SQLITE_PRAGMAS, "timeout": BUSY_TIMEOUT, "thread_safe": True}
    if "://" not in text:
        # ":memory:" is one database per connection, so per thread: only good for tests.
        path = None if text == ":memory:" else Path(text)
        return peewee.SqliteDatabase(text, **sqlite_options), path
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.startswith("postgres"):
        options = _postgres_options(parts)
    else:
        options = sqlite_options if parts.scheme == "sqlite" else {"thread_safe": True}
    try:
        db = db_url.connect(text, **options)
    except (RuntimeError, ValueError) as exc:
        raise RegistryError("cannot use database %s: %s" % (_display(text), exc)) from exc
    path = None
    if isinstance(db, peewee.SqliteDatabase) and db.database not in ("", ":memory:"):
        path = Path(db.database)
    return db, path


def _postgres_options(parts):
    """Connection options for a postgresql:// URL; what the URL's query sets wins."""
    try:
        import psycopg2  # noqa: F401  (peewee's driver; only a fleet needs it)
    except ImportError:
        raise RegistryError(
            "database %s is PostgreSQL, which needs psycopg2: pip install 'diglett[fleet]'"
            % _display(urllib.parse.urlunsplit(parts))) from None
    given = urllib.parse.parse_qs(parts.query)
    options = {"thread_safe": True, "field_types": PG_FIELD_TYPES}
    if "connect_timeout" not in given:
        options["connect_timeout"] = PG_CONNECT_TIMEOUT
    if "options" not in given:
        options["options"] = "-c statement_timeout=%s" % PG_STATEMENT_TIMEOUT
    return options


def _explain_postgres(exc, where):
    """An operator's message for a PostgreSQL failure: which server, and what to do."""
    text = " ".join(str(exc).split())  # libpq's messages span lines
    lower = text.lower()
    parts = urllib.parse.urlsplit(where)
    server = "%s:%s" % (parts.hostname or "localhost", parts.port or 5432)
    user = parts.username or default_actor()
    database = parts.path.lstrip("/")
    if "connection refused" in lower:
        return ("cannot connect to PostgreSQL at %s for %s: connection refused; start "
                "PostgreSQL there (listen_addresses and port in postgresql.conf) or fix "
                "`database` in the config" % (server, where))
    if "timeout expired" in lower:
        return ("no answer from PostgreSQL at %s within %d s (%s): check the host name, the "
                "network and the firewall" % (server, PG_CONNECT_TIMEOUT, where))
    if "could not translate host name" in lower:
        return "cannot resolve the host of %s (%s); fix `database` in the config" % (where, text)
    if "authentication failed" in lower or "no password supplied" in lower:
        return ("PostgreSQL at %s refused user %s (%s): check the user and password in "
                "`database` and the server's pg_hba.conf" % (server, user, text))
    if "does not exist" in lower and "database" in lower:
        return ("PostgreSQL at %s has no database %s: create it, e.g. as user postgres: "
                "createdb -O %s %s" % (server, database, user, database))
    if "does not exist" in lower and "role" in lower:
        return ("PostgreSQL at %s has no user %s: create it, e.g. as user postgres: "
                "createuser %s" % (server, user, user))
    if "permission denied" in lower:
        return ("user %s may not do this on %s (%s): make it the owner of database %s"
                % (user, where, text, database))
    if "statement timeout" in lower:
        return ("a statement on %s waited more than %s, probably for a lock: look for a long "
                "transaction in pg_stat_activity" % (where, PG_STATEMENT_TIMEOUT))
    if "closed the connection" in lower or "connection already closed" in lower \
            or "terminating connection" in lower:
        return ("lost the connection to PostgreSQL at %s (%s); diglett reconnects on the next "
                "call: check that PostgreSQL is running" % (server, text))
    if "does not exist" in lower and "relation" in lower:
        return "%s has no diglett schema (%s); run: diglett-admin migrate" % (where, text)
    return "database error on %s: %s" % (where, text)


def _display(database):
    """The database for messages: a path, or a URL without its password."""
    text = str(database)
    if "://" not in text:
        return text
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(":%s@" % parts.password, ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _is_busy(exc):
    """Worth a retry in a moment: a SQLite lock, a PostgreSQL deadlock or serialization
    conflict (PostgreSQL waits for locks by itself, up to PG_STATEMENT_TIMEOUT)."""
    lower = str(exc).lower()
    return any(word in lower for word in ("locked", "busy", "deadlock detected",
                                          "could not serialize"))


def _check_port(port):
    if port is None:
        return
    low, high = PORT_RANGE
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= high:
        raise RegistryError("port must be a number from %d to %d, got %r" % (*PORT_RANGE, port))


def _check_comment(comment):
    if comment is None:
        return
    if len(comment) > MAX_COMMENT_LEN or not comment.isprintable():
        raise RegistryError(
            "comment must be one line of at most %d printable characters" % MAX_COMMENT_LEN
        )


def _grant_of(row):
    return Grant(row.subdomain, row.key, row.port, row.comment, row.created)


def _session_of(row):
    return SessionRow(
        row.id, row.subdomain, row.key, row.host, row.port, row.remote,
        row.started, row.ended, row.state, row.reason, row.instance, row.gateway,
    )


def _ended(row, now):
    values = asdict(row)
    values.update(state=STATE_ENDED, reason=REASON_STALE, ended=now)
    return SessionRow(**values)


def _delivery_of(row):
    return Delivery(
        row.id, row.hook, row.event_id, row.subdomain, row.session, row.kind,
        json.loads(row.payload), row.state, row.attempts, row.next_attempt, row.last_error,
        row.created,
    )
