"""The hook outbox: the events each hook still has to handle, and what became of them.

This module owns queueing deliveries (``_queue``, called by sessions.py inside the write that
caused them, so a crash loses no hook's work), listing them, settling each attempt (with the
audit entries of the first failure, the death and the success) and pruning. It must not run a
hook: the server's hook runner reads the pending rows and reports back here.
"""

import json
import time

from diglett.registry.records import (
    DELIVERY_DEAD, DELIVERY_DONE, DELIVERY_PENDING, LEGACY_GATEWAY, STATE_ACTIVE, Delivery,
)


class OutboxTable:
    """Mixed into ``Registry``: uses ``self._outbox``, ``_sessions`` (an update is queued only
    for an active session), ``_call``, ``_write``, ``_write_query`` and ``_log``.

    The underscore methods run inside ``_call``, which retries and translates errors.
    """

    def pending_deliveries(self, hook, limit=500, gateway=None):
        """The oldest pending deliveries of ``hook``, in the order they were queued.

        With ``gateway``, only that gateway's (and rows from before gateways existed): each
        server's hooks deliver what its own sessions caused. A tuple names several: a master's
        hooks deliver its workers' rows (diglett.workers).
        """
        model = self._outbox
        where = (model.hook == hook) & (model.state == DELIVERY_PENDING)
        if gateway is not None:
            gateways = (gateway,) if isinstance(gateway, str) else tuple(gateway)
            where &= model.gateway.in_(gateways + (LEGACY_GATEWAY,))
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

    def settle_deliveries(self, done=(), failed=(), next_attempt=0.0, error=""):
        """Settle many deliveries in one transaction (one call of a hook that mirrors the
        whole state covered them all): ``done`` are ids it handled; ``failed`` are
        (id, attempts, dead) of those tried and failed with ``error``, retried at
        ``next_attempt`` unless dead. The audit trail gets what delivery_done and
        delivery_failed would write for each."""
        self._call(self._settle_many, list(done), list(failed), next_attempt, error)

    def _settle_many(self, done, failed, next_attempt, error):
        model = self._outbox
        groups = {}  # (attempts, dead) -> ids: one UPDATE per group and chunk
        for delivery_id, attempts, dead in failed:
            groups.setdefault((attempts, bool(dead)), []).append(delivery_id)
        actions = {delivery_id: "hook-done" for delivery_id in done}
        with self._write():
            for ids in _chunks(done):
                model.update(state=DELIVERY_DONE).where(model.id.in_(ids)).execute()
            for (attempts, dead), ids in groups.items():
                action = "hook-dead" if dead else "hook-failed" if attempts == 1 else None
                for chunk in _chunks(ids):
                    model.update(attempts=attempts, next_attempt=next_attempt,
                                 last_error=error[:2000],
                                 state=DELIVERY_DEAD if dead else DELIVERY_PENDING).where(
                        model.id.in_(chunk)).execute()
                if action is not None:
                    actions.update(dict.fromkeys(ids, action))
            entries = []
            for ids in _chunks(sorted(actions)):
                for row in model.select().where(model.id.in_(ids)).order_by(model.id):
                    detail = "hook=%s event=%s event_id=%s attempts=%d" % (
                        row.hook, row.kind, row.event_id, row.attempts)
                    failure = actions[row.id] != "hook-done" and error
                    entries.append(("server", actions[row.id], row.subdomain, None,
                                    detail + (" error=%s" % error[:300] if failure else "")))
            self._log_many(entries)

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

    def prune_deliveries(self, before):
        """Forget finished deliveries created before ``before`` (UNIX seconds)."""
        model = self._outbox
        query = model.delete().where((model.state != DELIVERY_PENDING) & (model.created < before))
        return self._call(self._write_query, query)

    def queue_update(self, session_id, deliveries):
        """Queue ``deliveries`` (an update event) for the session ``session_id`` while it is
        still active; False (nothing queued) once it ended: its route is gone anyway."""
        return self._call(self._queue_update, session_id, deliveries)

    def _queue_update(self, session_id, deliveries):
        sessions = self._sessions
        with self._write():
            row = sessions.get_or_none((sessions.id == session_id)
                                       & (sessions.state == STATE_ACTIVE))
            if row is None:
                return False
            self._queue(row, deliveries)
        return True

    def _queue(self, row, deliveries, gateway=None):
        """Outbox rows for the hooks of ``gateway`` (default: the session's own gateway)."""
        now = time.time()
        for hook, event in deliveries:
            self._outbox.insert(
                hook=hook, event_id=event["event_id"], subdomain=row.subdomain, session=row.id,
                kind=event["kind"], payload=json.dumps(event), state=DELIVERY_PENDING,
                next_attempt=now, created=now, gateway=row.gateway if gateway is None else gateway,
            ).execute()

    def _queue_many(self, items):
        """``_queue`` for many (row, deliveries, gateway) at once, in one prepared INSERT
        (the stale sessions of a crashed run, thousands at once)."""
        now = time.time()
        values = [{"hook": hook, "event_id": event["event_id"], "subdomain": row.subdomain,
                   "session": row.id, "kind": event["kind"], "payload": json.dumps(event),
                   "state": DELIVERY_PENDING, "next_attempt": now, "created": now,
                   "gateway": row.gateway if gateway is None else gateway}
                  for row, deliveries, gateway in items for hook, event in deliveries]
        self._insert_rows(self._outbox, values)


def _chunks(values, size=500):
    """``values`` in slices short enough for one SQL IN (...) list."""
    values = list(values)
    return [values[start:start + size] for start in range(0, len(values), size)]


def _delivery_of(row):
    return Delivery(
        row.id, row.hook, row.event_id, row.subdomain, row.session, row.kind,
        json.loads(row.payload), row.state, row.attempts, row.next_attempt, row.last_error,
        row.created,
    )
