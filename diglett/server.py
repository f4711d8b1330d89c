"""The diglett server: the gateway's parts, wired together, and their lifecycle.

Owns start-up (crash cleanup, grants, the agent port, the background loops), the admission
of an agent after its handshake (the authorize decision, takeover of the same key's
session, its tunnel port), reload (SIGHUP) and the drain on shutdown. The jobs themselves
live in diglett.gateway: the listener and handshake, the pure authorize decision, tunnel
ports, each AgentSession, session events (rows, outbox, signals), and the fleet loops. The
registry is reached only through one database thread (diglett.dbworker) so SQLite or
PostgreSQL never blocks the gevent hub; no hook is known here.

As a worker (``worker=True``, diglett.workers) it binds no agent socket: the master accepts
and passes each connection in (``serve_passed``); the rest is the same.
"""

import dataclasses
import logging
import time
import uuid

import gevent

from diglett import admission, config, crypto, handoff, metrics, wire
from diglett.dbworker import DatabaseWorker
from diglett.gateway import authorize, enrol, transports
from diglett.gateway.agent_session import AgentSession
from diglett.gateway.doors import Door, HoldCounters, Inherited
from diglett.gateway.events import SessionEvents
from diglett.gateway.fleet import GrantCache, Heartbeat, RegistryPoller
from diglett.gateway.handshake import Handshakes
from diglett.gateway.limits import MemoryBudget
from diglett.gateway.listener import AgentListener
from diglett.gateway.ports import TunnelPorts
from diglett.gateway.siblings import MOVED_HOLD, MovedIn
from diglett.reasons import CloseReason
from diglett.registry import RegistryError
from diglett.sockets import enable_keepalive, set_nodelay
from diglett.wire import ErrorCode

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config, registry, fdstore=None, worker=False):
        self.config = config
        self.worker = worker  # connections come from the master, not from our own sockets
        self.siblings = None  # a worker's: moves doors to and from other workers
        self.moved_away = {}  # name -> ((session, reason, traffic), deadline): end not told
        self.fdstore = fdstore or handoff.FdStore({})
        self.registry = registry
        self.keys = [crypto.load_or_create_private_key(config.key)]
        self.public_key = crypto.public_hex(self.keys[0])
        self.instance = uuid.uuid4().hex
        self.gateway_id = config.gateway_id
        self.db = DatabaseWorker(getattr(registry, "write_batch", None))
        self.admission = admission.Admission(
            config.max_startups, config.per_source_startups, config.penalty_max)
        self.handshakes = Handshakes(self.keys, self.admission)
        self.events = SessionEvents(self.db, registry, config.domain, self.gateway_id,
                                    self.instance)
        self.events.hook_names = tuple(config.sections.get("hooks", {}).get("enabled", ()))
        self.grants = GrantCache(self.db, registry)
        self.events.policy_of = self.grants.policy_of  # events carry the grant's policy
        self.ports = TunnelPorts(config)
        self.budget = MemoryBudget()
        self.sessions = {}  # subdomain -> the AgentSession serving it
        self.doors = {}  # subdomain -> its Door (tunnel port), which may outlive sessions
        self.draining = set()  # AgentSessions handed over to a newer one, finishing streams
        self.recorded_sessions = 0  # sessions whose start row was committed, ever
        self.hold_counters = HoldCounters()
        self.listener = None
        self.transports = []  # the tls:// and wss:// listeners (diglett.gateway.transports)
        self.address = self.agent_port = None
        self.stopping = False
        self.counters = metrics.Counters()  # refusals, and what ended sessions leave behind
        self._greenlets = []

    @property
    def hook_names(self):
        return self.events.hook_names

    @hook_names.setter
    def hook_names(self, names):
        self.events.hook_names = tuple(names)

    @property
    def handshake_failures(self):
        return self.handshakes.failures

    # ----- lifecycle ------------------------------------------------------------------
    def start(self):
        """Clean up after a previous run, then listen; returns the bound agent address."""
        passed = self.fdstore.doors()
        self._adopt(passed, self.events.end_stale(keep=passed))
        # ports survive restarts (another gateway's ports mean nothing on this host)
        self.ports.last.update(self.db.call(self.registry.last_ports, self.gateway_id))
        self.grants.reload()
        passed_agents = self.fdstore.take(handoff.AGENTS)
        self.listener = AgentListener(self.config.listen, self.admission, self._handle_agent,
                                      passed_agents, bind=not self.worker)
        passed_transports = {kind: self.fdstore.take(handoff.transport_name(kind))
                             for kind in transports.KINDS}
        self.fdstore.close_unused()
        if self.listener.sock is not None:
            self.fdstore.keep(self.listener.sock, handoff.AGENTS, passed_agents)
        self.agent_port = self.listener.address[1]
        self.address = "%s:%d" % self.listener.address
        # Our row exists before our first session does, so no gateway takes us for dead.
        self.db.call(self.registry.gateway_seen, self.gateway_id, self.instance, self.address)
        self.listener.start()
        self.transports = transports.start(self.config, self.admission, self._handle_agent,
                                           self.handshakes.failures, bind=not self.worker,
                                           inherited=passed_transports)
        for listener in self.transports:
            if listener.sock is not None:  # new agents wait in its backlog across a restart
                self.fdstore.keep(listener.sock, handoff.transport_name(listener.kind),
                                  passed_transports[listener.kind])
        self._greenlets = [gevent.spawn(RegistryPoller(self).run),
                           gevent.spawn(Heartbeat(self).run)]
        return self.listener.address

    def serve_passed(self, sock, kind):
        """A connection the master accepted on the agent port (``agents``) or on a transport
        listener (``tls``, ``ws``)."""
        listener = self.listener if kind == handoff.AGENTS else next(
            (t for t in self.transports if t.kind == kind), None)
        try:
            address = sock.getpeername()
        except OSError:  # gone already
            sock.close()
            return
        if listener is None:
            log.warning("agent=%s:%d passed for %s, which this worker does not serve",
                        address[0], address[1], kind)
            sock.close()
            return
        listener.serve(sock, address)

    def _adopt(self, passed, kept):
        """Open the doors whose ports the last run passed on, holding for its sessions."""
        for name, sock in passed.items():
            row = kept.get(name)
            if row is None or not self.config.hold_timeout:
                self.fdstore.remove(handoff.door_name(name))
                sock.close()
                if row is not None:
                    self.events.ended(row, CloseReason.SHUTDOWN, "")
                continue
            log.info("subdomain=%s tunnel port %s:%d came through the restart (fd store)",
                     name, *sock.getsockname()[:2])
            self.doors[name] = Door(name, sock, self)
            self.doors[name].hold_for(Inherited(row, self.events), CloseReason.SHUTDOWN, "")

    def stop(self, reason=CloseReason.SHUTDOWN):
        """Drain, as HTTP/2 does: no new agents or streams, a GOAWAY to every agent, open
        streams carry on for up to drain_timeout; then end what is left and the sessions.

        With an fd store the ports stay open in it and the sessions stay active in the
        registry, so the next run serves the same ports and routes (diglett.handoff)."""
        self.stopping = True
        handing_on = self.fdstore.enabled
        self.events.keep_active = handing_on
        gevent.killall(self._greenlets)
        if self.listener is not None:
            self.listener.close()
        for listener in self.transports:
            listener.close()
        for door in list(self.doors.values()):
            door.close(forget=not handing_on)  # no new visitors; open streams carry on
        sessions = list(self.sessions.values()) + list(self.draining)
        for session in sessions:
            session.drain()
        # Handing on, new visitors wait in the backlog while we drain: keep it short.
        drain, key = ((self.config.restart_drain, "restart_drain") if handing_on
                      else (self.config.drain_timeout, "drain_timeout"))
        deadline = time.monotonic() + drain
        while any(s.streams_open for s in sessions) and time.monotonic() < deadline:
            for session in sessions:
                session.tunnel.reset_spare_streams(answers_go_to_local=True)
            gevent.sleep(0.05)
        left = sum(s.streams_open for s in sessions)
        if left:
            log.warning("%s (%s s) reached: resetting %d open streams", key, drain, left)
        for session in sessions:
            session.terminate(reason, ErrorCode.SHUTTING_DOWN, "server shutting down")
        deadline = time.monotonic() + self.config.shutdown_timeout
        while (self.sessions or self.draining) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.db.drain(max(0.5, deadline - time.monotonic()))

    def apply_config(self, new):
        """Take a re-read config (SIGHUP); returns the changed keys that need a restart.

        Limits apply to new handshakes and streams at once, and stream_window and the timers
        to sessions that start from now on; addresses, the key, the database and the domain
        stay as they are until a restart.
        """
        old = self.config
        restart = [key for key in config.restart_keys() if getattr(new, key) != getattr(old, key)]
        self.config = dataclasses.replace(new, **{key: getattr(old, key) for key in restart})
        self.ports.config = self.config
        self.admission.start, self.admission.rate, self.admission.full = new.max_startups
        self.admission.per_source = new.per_source_startups
        self.admission.penalty_max = new.penalty_max
        return restart

    # ----- agents ---------------------------------------------------------------------
    def _handle_agent(self, sock, address, source):
        peer = "%s:%d" % address[:2]
        completed = self.handshakes.run(sock, peer, source, self.config)
        if completed is None:
            return
        set_nodelay(sock)
        enable_keepalive(sock)
        result = self._admit(completed)
        if isinstance(result, authorize.Refusal):
            log.warning("agent=%s key=%s refused: %s (%s)", peer,
                        crypto.fingerprint(completed.key), wire.code_name(result.code), result)
            self.admission.penalise(source, result.penalty)
            self.counters.refused(result.code)
            _send_refusal(sock, completed.session, result)
            return
        name, grant, door = result
        self.admission.clear(source)
        AgentSession(self, sock, completed, name, grant, door, peer).run()

    def _admit(self, completed):
        """(name, grant, Door) for a key that may have its name, or a Refusal. A live session
        of the same key is not ended here: the new one takes its door (make-before-break)."""
        key, request = completed.key, completed.request
        name = authorize.requested_name(request)
        refused = None if self.stopping else enrol.redeem(self, name, key, request)
        if refused is not None:  # an invite in CONFIG that did not become a grant
            return refused
        grants = self.grants.grants
        elsewhere = ()
        if isinstance(name, str) and not self.stopping:
            grants = self.grants.with_fresh(name, key)
            if grants is not None and (name, key) in grants:  # only a holder learns of others
                elsewhere = self._held_elsewhere(name)
        decision = authorize.authorize(request, key, grants, self.sessions,
                                       elsewhere=elsewhere, stopping=self.stopping)
        if isinstance(decision, authorize.Refusal):
            return decision
        door = self.doors.get(name)
        if door is not None and not door.closed:
            return name, decision, door
        moved = self._door_of_sibling(name, key, elsewhere)
        if moved is not None:
            listener, visitors = moved
            door = self.doors[name] = Door(name, listener, self)
            door.moved_in(MovedIn(), visitors, MOVED_HOLD)
            return name, decision, door
        try:
            listener = self.ports.bind(name, decision)
        except OSError as exc:
            log.error("subdomain=%s agent=%s no tunnel port: %s", name,
                      crypto.fingerprint(key), exc)
            return authorize.Refusal(ErrorCode.RESOURCE_SHORTAGE, "no free tunnel port")
        door = self.doors[name] = Door(name, listener, self)
        self.fdstore.store(listener, handoff.door_name(name))
        return name, decision, door

    def _door_of_sibling(self, name, key, elsewhere):
        """The listening socket of ``name``, moved here from the worker whose session of
        this key serves it (diglett.gateway.siblings); None if there is none to move."""
        held = next((row for row in elsewhere if row.subdomain == name and row.key == key),
                    None)
        if self.siblings is None or held is None:
            return None
        moved = self.siblings.request(held.gateway, name)
        if moved is not None:
            log.info("subdomain=%s tunnel port %s:%d moved here from gateway %s (%d held "
                     "visitors with it)", name, *moved[0].getsockname()[:2], held.gateway,
                     len(moved[1]))
        return moved

    def give_door(self, name):
        """Stop serving ``name``'s port, for the worker where a newer session of the key came
        in: (listening socket, held visitors), or None if no session of ours has it. The
        session that served it ends once the registry shows the new one (RegistryPoller)."""
        door, session = self.doors.get(name), self.sessions.get(name)
        if door is None or door.closed or door.session is not session or (
                session is None and door.left is None):
            return None
        listener, visitors, left = door.give_away()
        if left is not None:  # held for a session that left: its end waits for the new one
            self.moved_away[name] = (left, time.monotonic() + MOVED_HOLD)
        log.info("subdomain=%s tunnel port %s:%d handed to another worker (%s, %d held "
                 "visitors)", name, door.host, door.port,
                 "open streams carry on" if session is not None else "its session had left",
                 len(visitors))
        return listener, visitors

    def _held_elsewhere(self, name):
        """Other gateways' active sessions of ``name``; an unreadable registry lets the agent
        in (as if there were none)."""
        try:
            rows = self.db.call(self.registry.active_sessions_of, [name])
        except RegistryError as exc:
            log.warning("cannot check other gateways' sessions of %s: %s", name, exc)
            return ()
        return [row for row in rows if row.gateway != self.gateway_id]

    # ----- what the HTTP API, metrics and hooks read ----------------------------------
    def host_of(self, name):
        return self.events.host_of(name)

    def active_session_events(self):
        return self.events.active()

    def snapshots(self):
        """subdomain -> SessionSnapshot of every live session, taken now."""
        return {name: session.snapshot() for name, session in list(self.sessions.items())}

    def over_budget(self):
        buffered = sum(s.buffered for s in self.sessions.values())
        return self.budget.exceeded(buffered, self.config.memory_budget)

    def stats(self):
        return {
            "agents": len(self.sessions),
            "streams": sum(s.streams_open for s in self.sessions.values()),
            "pending_handshakes": self.admission.pending,
            "penalty_table": self.admission.penalty_table_size,
            "handshake_failures": dict(self.handshake_failures),
            "greenlets": metrics.greenlet_counts()[0],  # live ones: the dead are garbage
        }


def _send_refusal(sock, session, refusal):
    session.refuse(refusal.code, refusal.reason)
    try:
        sock.sendall(session.data_to_send())
    except OSError:
        pass
    sock.close()
