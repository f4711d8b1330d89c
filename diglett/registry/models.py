"""The peewee models of the current schema, and binding them to one database.

This module owns the tables as the code uses them today; migrations/ holds frozen copies, and
a test (peewee's diff_models) proves the two agree. It must not open a database, and its models
must not leave diglett.registry: callers get the dataclasses of records.py instead.
"""

import peewee

from diglett.registry.records import LEGACY_GATEWAY


class _Base(peewee.Model):
    class Meta:
        legacy_table_names = False


class GrantModel(_Base):
    subdomain = peewee.CharField(max_length=63)
    key = peewee.CharField(max_length=66)
    port = peewee.IntegerField(null=True, unique=True)  # NULLs do not collide
    comment = peewee.TextField(default="")
    created = peewee.FloatField()
    policy = peewee.TextField(null=True, default="{}")  # JSON of diglett.policy.Policy; NULL: {}

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


class InviteModel(_Base):
    """One-time enrolment codes; a redeemed one keeps the key it was bound to."""

    id = peewee.CharField(max_length=16, primary_key=True)  # hex of the code's invite id
    subdomain = peewee.CharField(max_length=63)
    secret_hash = peewee.CharField(max_length=64)  # SHA-256 hex: the secret is never stored
    policy = peewee.TextField(default="{}")  # the grant's policy, as grants.policy
    port = peewee.IntegerField(null=True)
    comment = peewee.TextField(default="")
    actor = peewee.TextField()
    created = peewee.FloatField()
    expires = peewee.FloatField()
    used = peewee.FloatField(null=True)
    used_by = peewee.CharField(max_length=66, null=True)

    class Meta:
        table_name = "invites"


class ChangeModel(_Base):
    """A counter per watched table (grants, sessions), bumped by triggers on every write of
    it: the server's polls read these instead of every row (migrations/0007_changes.py)."""

    name = peewee.CharField(max_length=32, primary_key=True)
    version = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "changes"


MODELS = (GrantModel, SessionModel, AuditLogModel, OutboxModel, KickModel,
          GatewayModel, InviteModel, ChangeModel)  # the migrations


def bind(model, db):
    """A subclass of ``model`` bound to ``db``, so two registries never share a binding."""
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    return type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})
