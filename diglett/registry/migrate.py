"""The schema migrations runner: applies migrations/NNNN_name.py in order, each once.

This module owns finding the numbered migration modules (top-level ``migrations/``, installed
as diglett.migrations), the ``schema_version`` bookkeeping, the PostgreSQL advisory lock that
lets one gateway at a time migrate, and refusing a schema newer than this code. It must not
describe tables itself: each migration carries frozen models of its own, models.py the live
ones.
"""

import importlib
import logging
import pkgutil
import re
import time

import peewee

import diglett.migrations
from diglett.registry.records import RegistryError

log = logging.getLogger(__name__)

MIGRATION_RE = re.compile(r"(\d{4})_([a-z0-9_]+)")  # migrations/NNNN_name.py
PG_MIGRATION_LOCK = 0x646967  # advisory lock id: one gateway at a time applies migrations


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


class Migrations:
    """Mixed into ``Registry``: uses ``self._versions``, ``db``, ``_is_sqlite``, ``_call``,
    ``_write`` and ``_writes`` (a migration may change the grants: the snapshot cache must go).

    The underscore methods run inside ``_call``, which retries and translates errors.
    """

    def migrate(self):
        """Apply missing migrations in order, each in its own transaction; return their names."""
        applied = []
        self._call(self._migrate, applied)
        return applied

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

    def schema_version(self):
        return self._call(self._current_version)

    def _current_version(self):
        if not self._versions.table_exists():
            return 0
        return self._versions.select(peewee.fn.MAX(self._versions.version)).scalar() or 0
