"""Change counters: how the server's once-a-second polls tell that nothing changed.

The ``changes`` table (migrations/0007_changes.py) holds a version per watched table, bumped
by triggers on every insert, update and delete of it, whoever writes (this server, another
gateway, diglett-admin, a hand-edited row). This module only reads them; it must not bump
them itself (the triggers do, inside the writing transaction).
"""

GRANTS = "grants"
SESSIONS = "sessions"


class ChangeTable:
    """Mixed into ``Registry``: uses ``self._changes`` and ``_call``."""

    def change_versions(self):
        """{watched table: version}; {} for a database migrated before the counters existed
        (callers then read everything, as before)."""
        return self._call(self._versions_now)

    def _versions_now(self):
        if not self._counted():
            return {}
        return {row.name: row.version for row in self._changes.select()}

    def _version_of(self, table):
        """The version of ``table``, inside a running call; None without the counters."""
        if not self._counted():
            return None
        model = self._changes
        return model.select(model.version).where(model.name == table).scalar()

    def _counted(self):
        """Whether the ``changes`` table exists (asked until it does: tables do not vanish)."""
        if not getattr(self, "_has_changes", False):
            self._has_changes = self._changes.table_exists()
        return self._has_changes
