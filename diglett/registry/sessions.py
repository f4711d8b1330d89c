"""Sessions: each agent session a gateway served, from start to end, and the ports they used.

This module owns recording starts and ends (with their hook deliveries and audit entries in
the same transaction), ending the sessions a dead or restarted gateway left behind, and the
last ports a restarted server hands back. It must not deliver hooks or send signals: it only
queues outbox rows, which the server's hook runner reads after the commit.
"""

import collections
import logging
import time
from dataclasses import asdict

import peewee

from diglett import names
from diglett.registry.records import (
    LEGACY_GATEWAY, REASON_STALE, STATE_ACTIVE, STATE_ENDED, SessionRow,
)

log = logging.getLogger(__name__)

IN_CHUNK = 500  # values in one SQL IN (...) list; old SQLite allows 999 parameters
SessionHead = collections.namedtuple("SessionHead", "id subdomain started gateway")


class SessionTable:
    """Mixed into ``Registry``: uses ``self._sessions``, ``_gateways`` (who is alive),
    ``_call``, ``_write``, ``_queue`` (the outbox) and ``_log`` (the audit trail).

    The underscore methods run inside ``_call``, which retries and translates errors.
    """

    def record_session_start(self, row, deliveries=()):
        """Record a new session and its hook deliveries; False if its id is already recorded.

        ``deliveries`` are (hook, event dict) pairs, written in the same transaction, so a
        crash a moment later loses no hook's work. Idempotent, because the server retries a
        failed write until it succeeds, and a write that failed after its commit must not
        turn into an error forever.
        """
        return self._call(self._insert_session, row, deliveries)

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

    def record_session_end(self, session_id, reason, ended, deliveries=(), detail=""):
        """Mark an active session ended (with its deliveries); False if it was not active.

        ``detail`` (e.g. bytes and streams) goes into the audit entry of the end.
        """
        return self._call(self._end_session, session_id, reason, ended, deliveries, detail)

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

    def active_session_heads(self, subdomains):
        """SessionHead (id, subdomain, started, gateway) of the active sessions of these names
        on any gateway, oldest first: the takeover check's question, read as plain tuples
        (thousands of names each time their sessions change)."""
        names_ = sorted(set(subdomains))
        model = self._sessions
        fields = (model.id, model.subdomain, model.started, model.gateway)

        def select():
            found = []
            for start in range(0, len(names_), IN_CHUNK):
                where = (model.state == STATE_ACTIVE) & model.subdomain.in_(
                    names_[start:start + IN_CHUNK])
                found.extend(list(model.select(*fields).where(where).tuples()))
            return sorted(map(SessionHead._make, found), key=lambda head: (head.started, head.id))

        return self._call(select)

    def end_stale_sessions(self, instance, deliveries_of=None, gateway=LEGACY_GATEWAY,
                           keep=()):
        """End (reason 'stale') active sessions of ``gateway`` owned by another server
        instance, i.e. left by this gateway's previous run; return them.

        Other gateways' sessions are never touched, nor the sessions of the names in
        ``keep`` (their ports came through a restart: the new run takes them over).
        ``deliveries_of(row)`` gives the (hook, event dict) pairs to queue for each, in the
        same transaction.
        """
        model = self._sessions
        where = ((model.state == STATE_ACTIVE) & (model.gateway == gateway)
                 & (model.instance != instance))
        if keep:
            where &= model.subdomain.not_in(list(keep))
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

    def _end_stale(self, where, deliveries_of, gateway):
        model = self._sessions
        now = time.time()
        with self._write():
            rows = [_ended(_session_of(row), now) for row in model.select().where(where)]
            ids = [row.id for row in rows]
            for start in range(0, len(ids), IN_CHUNK):
                model.update(state=STATE_ENDED, reason=REASON_STALE, ended=now).where(
                    model.id.in_(ids[start:start + IN_CHUNK])
                ).execute()
            # in bulk: a crashed gateway of thousands of agents leaves thousands of rows
            self._queue_many([(row, deliveries_of(row), gateway) for row in rows])
            self._log_many([("server", "session-end", row.subdomain, row.key,
                             "session=%s remote=%s reason=%s gateway=%s"
                             % (row.id, row.remote, REASON_STALE, row.gateway))
                            for row in rows])
        return rows

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


def _session_of(row):
    return SessionRow(
        row.id, row.subdomain, row.key, row.host, row.port, row.remote,
        row.started, row.ended, row.state, row.reason, row.instance, row.gateway,
    )


def _ended(row, now):
    return SessionRow(row.id, row.subdomain, row.key, row.host, row.port, row.remote,
                      row.started, now, STATE_ENDED, REASON_STALE, row.instance, row.gateway)
