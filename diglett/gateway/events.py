"""Session rows, their outbox deliveries and the signals, always in that order.

A session's start or end is one registry transaction holding its row and one outbox
delivery per enabled hook; the signal goes out only after that commit, so
a hook that acts on it finds the row, and a crash in between leaves the delivery to be
retried. Writes are queued on the database thread in order; nothing here waits for them but
start-up and the crash cleanup.
"""

import functools
import logging
import time

from diglett import signals
from diglett.reasons import CloseReason
from diglett.registry import RegistryError
from diglett.signals import EventKind, SessionEvent

log = logging.getLogger(__name__)


class SessionEvents:
    def __init__(self, db, registry, domain, gateway_id, instance):
        self.db = db
        self.registry = registry
        self.domain = domain
        self.gateway_id = gateway_id
        self.instance = instance
        self.hook_names = ()  # the enabled hooks: one outbox row each per event
        self.adopted = set()  # ids of the last run's sessions whose ports came through
        self.keep_active = False  # stopping with the ports in the fd store: record no ends

    def host_of(self, name):
        return "%s.%s" % (name, self.domain)

    def policy_of(self, subdomain, key):
        """The grant's policy JSON for the events; the server sets its GrantCache.policy_of
        here (read from memory, never from the database). By default: none."""
        return {}

    def event(self, row, kind, reason=""):
        return SessionEvent(
            kind=kind, subdomain=row.subdomain, host=self.host_of(row.subdomain),
            listen_host=row.host, listen_port=row.port, agent_key=row.key,
            session_id=row.id, reason=reason, started=row.started,
            policy=self.policy_of(row.subdomain, row.key))

    def deliveries(self, event):
        """One outbox row per enabled hook, written with the session change."""
        return [(name, event.to_json()) for name in self.hook_names]

    def updated(self, row):
        """The grant of a live session changed its policy: queue an update for every hook,
        then signal; nothing if the session ended meanwhile (its route is gone)."""
        event = self.event(row, EventKind.UPDATE)
        queued = {}

        def queue():
            queued["done"] = self.registry.queue_update(row.id, self.deliveries(event))

        def committed():
            if queued.get("done"):
                signals.session_updated.send(self, event=event)

        self.db.submit(queue, (), after=committed)

    def started(self, row, recorded):
        """Queue the row; ``recorded()`` runs once it is committed, before the signal."""
        event = self.event(row, EventKind.CONNECT)

        def committed():
            recorded()
            signals.session_started.send(self, event=event)

        self.db.submit(self.registry.record_session_start, (row, self.deliveries(event)),
                       after=committed)

    def ended(self, row, reason, detail):
        if self.keep_active:
            # The next run takes the port and this row over; its hooks keep the route.
            log.info("subdomain=%s session=%s left active for the next run (port %d in the "
                     "fd store)", row.subdomain, row.id, row.port)
            return
        self.adopted.discard(row.id)
        event = self.event(row, EventKind.DISCONNECT, reason)
        self.db.submit(self.registry.record_session_end,
                       (row.id, reason, time.time(), self.deliveries(event), detail),
                       after=lambda: signals.session_ended.send(self, event=event))

    def end_stale(self, keep=()):
        """Our previous run's sessions (never other gateways'), ended at start-up, except
        those of the names in ``keep``: {name: row} of these, adopted by this run."""
        for row, event in self._end(self.registry.end_stale_sessions, self.instance,
                                    gateway=self.gateway_id, keep=tuple(keep)):
            log.info("subdomain=%s session=%s ended reason=stale (port %d)",
                     row.subdomain, row.id, row.port)
            signals.session_ended.send(self, event=event)
        if not keep:
            return {}
        rows = self.db.call(self.registry.active_sessions, self.gateway_id)
        kept = {row.subdomain: row for row in rows
                if row.subdomain in keep and row.instance != self.instance}
        self.adopted.update(row.id for row in kept.values())
        return kept

    def end_dead_gateways(self, stale_after):
        """The sessions of gateways that stopped refreshing their row; our hooks deliver."""
        try:
            ended = self._end(self.registry.end_sessions_of_dead_gateways, self.gateway_id,
                              stale_after)
        except RegistryError as exc:
            log.warning("cannot check for gateways that are gone: %s", exc)
            return
        for row, event in ended:
            log.warning("subdomain=%s session=%s ended reason=stale: gateway %s not seen for "
                        "%s s", row.subdomain, row.id, row.gateway, stale_after)
            signals.session_ended.send(self, event=event)

    def _end(self, end_sessions, *args, **kwargs):
        """(row, event) of the sessions ``end_sessions`` ended, their deliveries written in
        the same transaction."""
        events = {}

        def deliveries_of(row):  # runs inside the registry's transaction
            events[row.id] = self.event(row, EventKind.DISCONNECT, CloseReason.STALE)
            return self.deliveries(events[row.id])

        rows = self.db.call(functools.partial(end_sessions, deliveries_of=deliveries_of, **kwargs),
                            *args)
        return [(row, events[row.id]) for row in rows]

    def active(self):
        """Connect events of this server's active sessions, as the registry holds them."""
        rows = self.db.call(self.registry.active_sessions, self.gateway_id)
        return [self.event(row, EventKind.CONNECT) for row in rows
                if row.instance == self.instance or row.id in self.adopted]
