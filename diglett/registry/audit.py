"""The audit trail: who did what to which name, appended in the transaction that did it.

This module owns appending (``_log``, which every other table calls inside its own write),
reading newest first and pruning. It must not open a transaction in ``_log``: an entry commits
or rolls back with the change it describes.
"""

import time

from diglett.registry.records import AuditEntry, default_actor


class AuditTable:
    """Mixed into ``Registry``: uses ``self._audit``, ``_call``, ``_write`` and ``_write_query``."""

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

    def _log(self, actor, action, subdomain, key, detail):
        self._audit.create(
            time=time.time(), actor=actor, action=action, subdomain=subdomain, key=key,
            detail=detail,
        )

    def _log_many(self, entries):
        """``_log`` for many (actor, action, subdomain, key, detail) at once, in one prepared
        INSERT (thousands of stale sessions ended at start-up)."""
        now = time.time()
        rows = [{"time": now, "actor": actor, "action": action, "subdomain": subdomain,
                 "key": key, "detail": detail}
                for actor, action, subdomain, key, detail in entries]
        self._insert_rows(self._audit, rows)
