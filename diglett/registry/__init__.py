"""The registry: grants, sessions, gateways and the audit log in SQLite or PostgreSQL.

The package offers a small synchronous API that returns plain frozen dataclasses; no peewee
object leaves it. It must not import gevent or know about sockets: the server calls it from one
dedicated OS thread (gevent's threadpool), because a SQLite call, and a psycopg2 call just as
much, blocks the thread that makes it; diglett-admin calls it directly. Every database failure
leaves as a RegistryError whose message names the database and says what to do.

One registry may be shared by several servers ("gateways", each with its own
``[server] gateway_id``) when it lives in PostgreSQL: grants are shared, while sessions, hook
deliveries and kicks carry the gateway that owns them, and the ``gateways`` table says which
gateways are alive (each refreshes its row every few seconds).

The package is split by job: ``records`` (what callers get back), ``models`` (the peewee
tables), ``database`` (opening, retries, operator messages), ``migrate`` (the migrations
runner), one module per table (``grants``, ``sessions``, ``gateways``, ``kicks``, ``audit``,
``outbox``), each holding its public methods next to their implementation, and ``api``, which
composes them into ``Registry``. This module only re-exports what the rest of diglett uses, so
callers write ``from diglett.registry import Registry``; it must hold no code of its own.
"""

from diglett.registry.api import Registry
from diglett.registry.database import (
    BUSY_TIMEOUT, PG_CONNECT_TIMEOUT, PG_FIELD_TYPES, PG_STATEMENT_TIMEOUT, RETRY_DELAYS,
    SQLITE_PRAGMAS,
)
from diglett.registry.grants import MAX_COMMENT_LEN, PORT_RANGE
from diglett.registry.migrate import MIGRATION_RE, PG_MIGRATION_LOCK, migration_names
from diglett.registry.models import (
    MODELS, AuditLogModel, GatewayModel, GrantModel, KickModel, OutboxModel, SchemaVersionModel,
    SessionModel,
)
from diglett.registry.records import (
    DELIVERY_DEAD, DELIVERY_DONE, DELIVERY_PENDING, LEGACY_GATEWAY, REASON_STALE, STATE_ACTIVE,
    STATE_ENDED, AuditEntry, Delivery, GatewayRow, Grant, RegistryError, SessionRow,
    default_actor, iso_time,
)
from diglett.registry.sessions import IN_CHUNK

__all__ = [
    "AuditEntry", "AuditLogModel", "BUSY_TIMEOUT", "DELIVERY_DEAD", "DELIVERY_DONE",
    "DELIVERY_PENDING", "Delivery", "GatewayModel", "GatewayRow", "Grant", "GrantModel",
    "IN_CHUNK", "KickModel", "LEGACY_GATEWAY", "MAX_COMMENT_LEN", "MIGRATION_RE", "MODELS",
    "OutboxModel", "PG_CONNECT_TIMEOUT", "PG_FIELD_TYPES", "PG_MIGRATION_LOCK",
    "PG_STATEMENT_TIMEOUT", "PORT_RANGE", "REASON_STALE", "RETRY_DELAYS", "Registry",
    "RegistryError", "SQLITE_PRAGMAS", "STATE_ACTIVE", "STATE_ENDED", "SchemaVersionModel",
    "SessionModel", "SessionRow", "default_actor", "iso_time", "migration_names",
]
