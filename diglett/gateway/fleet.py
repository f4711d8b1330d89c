"""What reaches this gateway through the shared registry, and what it tells the others.

``GrantCache`` holds the grants in memory (the handshake path never waits on the database
for a known grant). ``RegistryPoller`` is how diglett-admin and other gateways reach a
running server: every second it reads the registry's change counters, reloads the grants
when theirs moved (a revoke bites within ~2 s), handles kicks addressed to this gateway, ends
sessions that a newer session of the same name elsewhere replaced (looked for only when the
sessions' counter moved), and now and then prunes the audit trail. An idle gateway's poll
reads a few integers, whatever the number of agents. ``Heartbeat`` refreshes this
gateway's row so the others see it alive, and ends the sessions of gateways gone silent.
Every registry failure is logged and waited out: the tunnels stay up.
"""

import logging
import time

import gevent

from diglett.gateway.siblings import MOVED_HOLD
from diglett.reasons import CloseReason
from diglett.registry import RegistryError, changes
from diglett.wire import ErrorCode

log = logging.getLogger(__name__)

GRANT_POLL_INTERVAL = 1.0  # seconds between grant reloads: a revoke bites within ~2 s
GATEWAY_REFRESH = 5.0  # seconds between refreshes of this gateway's row (less if stale_after/3)
AUDIT_PRUNE_INTERVAL = 3600  # seconds between prunes of audit entries past audit_retention


class GrantCache:
    def __init__(self, db, registry):
        self.db = db
        self.registry = registry
        self.grants = None  # (subdomain, key) -> Grant; None until first loaded (fail closed)
        self.version = None  # the grants' change counter when they were read (None: unknown)

    def current(self, version):
        """Whether the grants held are those of the change counter ``version``."""
        return version is not None and version == self.version and self.grants is not None

    def reload(self, version=None):
        """Read every grant, unless ``version`` (the grants' change counter, read before)
        says they are the ones held. True when they were read; False when unchanged, or
        when the registry cannot answer (the last ones kept)."""
        if self.current(version):
            return False
        try:
            self.grants = self.db.call(self.registry.grant_snapshot)
        except RegistryError as exc:
            log.warning("cannot read grants (keeping the last ones): %s", exc)
            return False
        self.version = version
        return True

    def with_fresh(self, name, key):
        """The grants, plus one made since the last poll: an agent started right after
        `grant` gets in."""
        if self.grants is None or (name, key) in self.grants:
            return self.grants
        try:
            grant = self.db.call(self.registry.find_grant, name, key)
        except RegistryError as exc:
            log.warning("cannot read grants: %s", exc)
            return self.grants
        if grant is not None:
            self.grants[(name, key)] = grant
        return self.grants

    def add(self, grant):
        """A grant made here (an enrolment): usable at once, before the next poll."""
        if self.grants is not None:
            self.grants[(grant.subdomain, grant.key)] = grant

    def policy_of(self, name, key):
        """The JSON policy of the grant (name, key), from memory; {} when there is none."""
        grant = (self.grants or {}).get((name, key))
        return grant.policy.to_json() if grant is not None else {}


class RegistryPoller:
    def __init__(self, server):
        self.server = server  # reads its sessions, config, db and registry; ends sessions
        self._sessions_seen = None  # the sessions' change counter at the last takeover check
        self._checked = frozenset()  # ids of the sessions that check looked at
        self._recorded_seen = None  # the server's count of recorded sessions at that check

    def run(self):
        pruned = 0.0
        while True:
            gevent.sleep(GRANT_POLL_INTERVAL)
            versions = self.change_versions()
            self.revoke_ungranted(versions.get(changes.GRANTS))
            self.handle_kicks()
            self.check_takeovers(versions.get(changes.SESSIONS))
            if time.monotonic() - pruned > AUDIT_PRUNE_INTERVAL:
                pruned = time.monotonic()
                self.prune_audit()

    def change_versions(self):
        """{table: version} of the registry's change counters; {} when unknown (every check
        then reads everything)."""
        try:
            return self.server.db.call(self.server.registry.change_versions)
        except RegistryError as exc:
            log.warning("cannot read the registry's change counters: %s", exc)
            return {}

    def revoke_ungranted(self, version=None):
        """Reload the grants if their change counter ``version`` moved (None: unknown, so
        always): end the sessions whose grant went, and tell the hooks of those whose grant
        changed its policy (the route changes, the agent stays connected)."""
        cache = self.server.grants
        if cache.current(version):
            return
        # The grants as they were: a session admitted while the reload runs was admitted
        # (and its route rendered) with these too, so it is compared like the others.
        old = GrantCache(None, None)
        old.grants = cache.grants
        if not cache.reload(version):
            return
        for session in list(self.server.sessions.values()):
            if (session.subdomain, session.key) not in cache.grants:
                session.terminate(CloseReason.REVOKED, ErrorCode.REVOKED, "grant revoked")
            elif old.grants is not None and old.policy_of(
                    session.subdomain, session.key) != cache.policy_of(
                    session.subdomain, session.key):
                log.info("%s policy changed: updating its routes", session.label)
                self.server.events.updated(session.row())

    def handle_kicks(self):
        server = self.server
        try:
            kicks = server.db.call(server.registry.pending_kicks, server.gateway_id)
        except RegistryError as exc:
            log.warning("cannot read kick requests: %s", exc)
            return
        for kick_id, name, delay, actor in kicks:
            session = server.sessions.get(name)
            if session is None:
                result = "not connected"
            else:
                session.terminate(CloseReason.KICKED, ErrorCode.KICKED, "kicked by %s" % actor,
                                  retry_after=delay)
                result = "kicked session %s" % session.session_id
            log.info("subdomain=%s kick by %s: %s", name, actor, result)
            try:
                server.db.call(server.registry.kick_handled, kick_id, result)
            except RegistryError as exc:
                log.warning("cannot record a kick: %s", exc)

    def check_takeovers(self, version=None):
        """End our session of a name that has a newer session on another gateway (the same
        agent key reconnected there), or whose row another gateway ended as stale.

        Only when the sessions' change counter ``version`` moved since the last check (None:
        unknown, so always) or a session is ours that it did not look at: every such change
        is a write to the sessions table."""
        server = self.server
        unchanged = version is not None and version == self._sessions_seen
        recorded = getattr(server, "recorded_sessions", None)  # counts our commits
        # a port moved to another worker: its hold also ends by time, not only by a write
        waiting = server.moved_away or any(s.door.moved for s in server.sessions.values())
        if unchanged and recorded is not None and recorded == self._recorded_seen and not waiting:
            return  # no write anywhere, no new session of ours: nothing to look at
        mine = {name: s for name, s in server.sessions.items() if s.recorded}
        ids = frozenset(s.session_id for s in mine.values())
        if unchanged and ids <= self._checked and not waiting:
            self._recorded_seen = recorded
            return
        if not mine and not server.moved_away:
            self._sessions_seen, self._checked, self._recorded_seen = version, ids, recorded
            return
        try:
            rows = server.db.call(server.registry.active_session_heads,
                                  list(mine) + list(server.moved_away))
        except RegistryError as exc:
            log.warning("cannot check for takeovers: %s", exc)
            return
        self._sessions_seen, self._checked, self._recorded_seen = version, ids, recorded
        self.report_moved_away(rows)
        active = {row.id for row in rows}
        by_name = {}
        for row in rows:  # oldest first
            by_name.setdefault(row.subdomain, []).append(row)
        for name, session in mine.items():
            if server.sessions.get(name) is not session:
                continue  # ended meanwhile
            door = session.door
            if door.moved and time.monotonic() - door.moved_at > MOVED_HOLD:
                # its port went to a session that never showed up: reconnecting, the agent
                # gets the port back wherever it lands
                log.warning("%s its port moved to another worker %.0f s ago and no session "
                            "there took over: ending it", session.label, MOVED_HOLD)
                session.hand_over()
                continue
            newer = [row for row in by_name.get(name, ())
                     if (row.started, row.id) > (session.started, session.session_id)]
            if newer:
                log.info("%s replaced by session %s on gateway %s", session.label,
                         newer[-1].id, newer[-1].gateway)
                if session.door.moved:  # a sibling worker serves our port: finish streams
                    session.hand_over()
                    continue
                session.terminate(CloseReason.REPLACED, ErrorCode.REPLACED,
                                  "replaced by a new connection on gateway %s" % newer[-1].gateway)
            elif session.session_id not in active:
                log.warning("%s was ended in the registry by another gateway (this one was "
                            "silent too long); closing it so the agent reconnects", session.label)
                session.terminate(CloseReason.STALE, ErrorCode.SHUTTING_DOWN,
                                  "session ended by the registry; reconnect")

    def report_moved_away(self, rows):
        """Report the end of a left session whose held port went to another worker, once
        the registry shows the session there (or MOVED_HOLD passed), so its route stays."""
        moved = self.server.moved_away
        for name, ((gone, reason, traffic), deadline) in list(moved.items()):
            if any(row.subdomain == name and row.id != gone.session_id for row in rows) or \
                    time.monotonic() > deadline:
                del moved[name]
                gone.report_end(reason, traffic)

    def prune_audit(self):
        server = self.server
        retention = server.config.audit_retention
        try:
            removed = server.db.call(server.registry.prune_audit, time.time() - retention)
        except RegistryError as exc:
            log.warning("cannot prune the audit trail: %s", exc)
            return
        if removed:
            log.info("pruned %d audit entries older than %s s", removed, retention)


class Heartbeat:
    """Refresh our row so other gateways see us alive; end the sessions of those gone."""

    def __init__(self, server):
        self.server = server  # reads its config, db, registry, identity and events
        self._announcing = False  # a refresh of our gateways row is queued

    def run(self):
        stale_after = self.server.config.gateway_stale_after
        period = max(1.0, min(GATEWAY_REFRESH, stale_after / 3.0))
        while True:
            gevent.sleep(period)
            self.announce()
            self.server.events.end_dead_gateways(stale_after)

    def announce(self):
        """Queued like the session writes, so the refresh never overtakes them; one at a time."""
        if self._announcing:
            return  # the last one still waits behind slow writes
        self._announcing = True
        server = self.server
        result = {}

        def refresh_gateway():
            result["previous"] = server.registry.gateway_seen(server.gateway_id, server.instance,
                                                              server.address)

        def done():
            self._announcing = False
            self._check_gateway_id(result.get("previous"))

        server.db.submit(refresh_gateway, (), after=done)

    def _check_gateway_id(self, previous):
        server = self.server
        if previous is None or previous == server.instance:
            return
        log.error("gateway_id %s is also used by another server (instance %s); give every "
                  "server its own [server] gateway_id", server.gateway_id, previous)
