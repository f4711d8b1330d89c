"""``Registry``: the one object callers hold, composed of one mixin per table.

This module owns what the mixins share: the connection (database.py), the peewee models bound
to it, and the grant snapshot's cache state. It must hold no queries: each public method lives
next to its implementation in the module of its table, so one file tells the whole story of a
table.

Why mixins rather than one object per table: callers (the server, diglett-admin, hooks, the
tests) hold one ``Registry`` and call ``registry.grant(...)``, and a write to one table also
writes others in the same transaction (a session end queues outbox rows and an audit entry),
so the tables share one connection and one ``_write``; composed objects would need either a
forwarding method per public method or every caller rewritten.
"""

import threading

from diglett.registry.audit import AuditTable
from diglett.registry.changes import ChangeTable
from diglett.registry.database import Connection
from diglett.registry.gateways import GatewayTable
from diglett.registry.grants import GrantTable
from diglett.registry.invites import InviteTable
from diglett.registry.kicks import KickTable
from diglett.registry.migrate import Migrations
from diglett.registry.models import (
    AuditLogModel, ChangeModel, GatewayModel, GrantModel, InviteModel, KickModel, OutboxModel,
    SchemaVersionModel, SessionModel, bind,
)
from diglett.registry.outbox import OutboxTable
from diglett.registry.sessions import SessionTable


class Registry(GrantTable, InviteTable, SessionTable, GatewayTable, KickTable, AuditTable,
               OutboxTable, ChangeTable, Migrations, Connection):
    """Grants, sessions, gateways, kicks, the audit trail and the hook outbox in one database.

    Every method is synchronous and thread-agnostic; ``Connection`` says how threads, locks
    and lost connections are handled.
    """

    def __init__(self, database, *, migrate=True, create_dirs=False):
        super().__init__(database, create_dirs=create_dirs)
        self._grants = bind(GrantModel, self.db)
        self._sessions = bind(SessionModel, self.db)
        self._audit = bind(AuditLogModel, self.db)
        self._versions = bind(SchemaVersionModel, self.db)
        self._outbox = bind(OutboxModel, self.db)
        self._kicks = bind(KickModel, self.db)
        self._gateways = bind(GatewayModel, self.db)
        self._invites = bind(InviteModel, self.db)
        self._changes = bind(ChangeModel, self.db)
        self._writes = 0  # bumped after each own commit: invalidates the grant snapshot cache
        self._local = threading.local()  # per-connection snapshot cache (like peewee's state)
        if migrate:
            self.migrate()

    def __repr__(self):
        return "<Registry %s>" % self.location
