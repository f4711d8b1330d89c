"""The diglett server: accepts agents, authorizes them, and gives each a tunnel port.

Owns the agent listener, the handshake and CONFIG checks, one AgentSession per connected
agent (its tunnel port and its Tunnel), takeover and revocation. The registry is reached
only through one database thread (diglett.dbworker) so SQLite or PostgreSQL never blocks the
gevent hub; grants are cached in memory. Signals go out after the session row is committed;
no hook is known here.

Several servers may share one registry, each as its own gateway (``[server] gateway_id``):
every server polls it for revoked grants, for kicks addressed to it and for newer sessions
of its names on other gateways (takeover), refreshes its own row in the gateways table, and
ends the sessions of gateways that stopped refreshing theirs.
"""

import dataclasses
import ipaddress
import logging
import random
import time
import uuid

import gevent
import gevent.event
import gevent.pool
from gevent import socket

from diglett import (__version__, admission, crypto, metrics, names, noise, protocol,
                     proxyproto, signals, wire)
from diglett.dbworker import DatabaseWorker
from diglett.registry import REASON_STALE, RegistryError, SessionRow
from diglett.tunnel import (Tunnel, close_with_rst, enable_keepalive, recv_exact,
                            reset_unless_finished, set_nodelay)
from diglett.wire import ErrorCode, ProtocolError, RejectCode

log = logging.getLogger(__name__)

GRANT_POLL_INTERVAL = 1.0  # seconds between grant reloads: a revoke bites within ~2 s
GATEWAY_REFRESH = 5.0  # seconds between refreshes of this gateway's row (less if stale_after/3)
ACCEPT_BACKLOG = 1024
PORT_ATTEMPTS = 64  # random ports tried in a configured range before giving up
TAKEOVER_WAIT = 5.0  # seconds the new session waits for the replaced one to wind down
AUDIT_PRUNE_INTERVAL = 3600  # seconds between prunes of audit entries past audit_retention
LIMIT_LOG_INTERVAL = 10.0  # seconds between log lines about the same limit being hit
BUDGET_REFUSE = 0.75  # share of memory_budget buffered at which new streams are refused
BUDGET_RESUME = 0.50  # ... and below which they are taken again
PROXY_HEADER_TIMEOUT = 5.0  # seconds a proxy_trusted source has to send its PROXY header
PRESSURE_HANDSHAKE_MIN = 1.0  # seconds: the shortest handshake deadline under pressure
RESTART_KEYS = ("listen", "http", "key", "database", "domain", "bind", "token")  # not live


class HandshakeTimeout(Exception):
    pass


class ProxyHeaderTimeout(Exception):
    def __str__(self):
        return "no complete header within %.0f s" % PROXY_HEADER_TIMEOUT


class Refusal(Exception):
    """An authenticated agent is refused: ERROR(code, reason) goes back to it."""

    def __init__(self, code, reason, penalty=0.0):
        super().__init__(reason)
        self.code = code
        self.penalty = penalty


class TokenBucket:
    """New streams per second: beyond the burst, callers wait (queued, never refused)."""

    def __init__(self, rate, burst):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self):
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            gevent.sleep((1 - self.tokens) / self.rate)


class Server:
    def __init__(self, config, registry):
        self.config = config
        self.registry = registry
        self.keys = [crypto.load_or_create_private_key(config.key)]
        self.public_key = crypto.public_hex(self.keys[0])
        self.instance = uuid.uuid4().hex
        self.gateway_id = config.gateway_id
        self._announcing = False  # a refresh of our gateways row is queued
        self.db = DatabaseWorker()
        self.hook_names = tuple(config.sections.get("hooks", {}).get("enabled", ()))
        self.admission = admission.Admission(
            config.max_startups, config.per_source_startups, config.penalty_max)
        self.sessions = {}  # subdomain -> AgentSession
        self.grants = None  # (subdomain, key) -> Grant; None until first loaded (fail closed)
        self.last_ports = {}
        self.listener = None
        self._over_budget = False
        self.agent_port = None
        self.stopping = False
        self.handshake_failures = {}
        self.counters = metrics.Counters()  # refusals, and what ended sessions leave behind
        self._greenlets = []

    # ----- lifecycle ------------------------------------------------------------------
    def start(self):
        """Clean up after a previous run, then listen; returns the bound agent address."""
        events = {}

        def deliveries_of(row):  # runs inside the registry's transaction
            events[row.id] = self._event(row, "disconnect", "stale")
            return self._deliveries(events[row.id])

        for row in self.db.call(self.registry.end_stale_sessions, self.instance, deliveries_of,
                                self.gateway_id):  # our previous run's; never other gateways'
            log.info("subdomain=%s session=%s ended reason=stale (port %d)",
                     row.subdomain, row.id, row.port)
            signals.session_ended.send(self, event=events[row.id])
        # ports survive restarts (another gateway's ports mean nothing on this host)
        self.last_ports = self.db.call(self.registry.last_ports, self.gateway_id)
        self._reload_grants()
        self.listener = socket.socket(_family(self.config.listen[0]), socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(self.config.listen)
        self.listener.listen(ACCEPT_BACKLOG)
        self.agent_port = self.listener.getsockname()[1]
        self.address = "%s:%d" % self.listener.getsockname()[:2]
        # Our row exists before our first session does, so no gateway takes us for dead.
        self.db.call(self.registry.gateway_seen, self.gateway_id, self.instance, self.address)
        self._greenlets = [gevent.spawn(self._accept_loop), gevent.spawn(self._poll_grants),
                           gevent.spawn(self._keep_alive)]
        return self.listener.getsockname()[:2]

    def stop(self, reason="shutdown"):
        """Drain, as HTTP/2 does: no new agents or streams, a GOAWAY to every agent, open
        streams carry on for up to drain_timeout; then end what is left and the sessions."""
        self.stopping = True
        gevent.killall(self._greenlets)
        if self.listener is not None:
            self.listener.close()
        sessions = list(self.sessions.values())
        for session in sessions:
            session.drain()
        deadline = time.monotonic() + self.config.drain_timeout
        while any(s.tunnel.pumps for s in sessions) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        left = sum(len(s.tunnel.pumps) for s in sessions)
        if left:
            log.warning("drain_timeout (%s s) reached: resetting %d open streams",
                        self.config.drain_timeout, left)
        for session in sessions:
            session.terminate(reason, ErrorCode.SHUTTING_DOWN, "server shutting down")
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.sessions and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.db.drain(max(0.5, deadline - time.monotonic()))

    def apply_config(self, new):
        """Take a re-read config (SIGHUP); returns the changed keys that need a restart.

        Limits apply to new handshakes and streams at once, and stream_window and the timers
        to sessions that start from now on; addresses, the key, the database and the domain
        stay as they are until a restart.
        """
        old = self.config
        restart = [key for key in RESTART_KEYS if getattr(new, key) != getattr(old, key)]
        self.config = dataclasses.replace(new, **{key: getattr(old, key) for key in restart})
        self.admission.start, self.admission.rate, self.admission.full = new.max_startups
        self.admission.per_source = new.per_source_startups
        self.admission.penalty_max = new.penalty_max
        return restart

    # ----- grants ---------------------------------------------------------------------
    def _reload_grants(self):
        try:
            self.grants = self.db.call(self.registry.grant_snapshot)
        except RegistryError as exc:
            log.warning("cannot read grants (keeping the last ones): %s", exc)
            return
        for session in list(self.sessions.values()):
            if (session.subdomain, session.key) not in self.grants:
                session.terminate("revoked", ErrorCode.REVOKED, "grant revoked")

    def _poll_grants(self):
        """The registry is how diglett-admin and other gateways reach us: grants (revoke),
        kick requests and newer sessions of our names elsewhere (takeover)."""
        pruned = 0.0
        while True:
            gevent.sleep(GRANT_POLL_INTERVAL)
            self._reload_grants()
            self._handle_kicks()
            self._check_takeovers()
            if time.monotonic() - pruned > AUDIT_PRUNE_INTERVAL:
                pruned = time.monotonic()
                self._prune_audit()

    def _handle_kicks(self):
        try:
            kicks = self.db.call(self.registry.pending_kicks, self.gateway_id)
        except RegistryError as exc:
            log.warning("cannot read kick requests: %s", exc)
            return
        for kick_id, name, delay, actor in kicks:
            session = self.sessions.get(name)
            if session is None:
                result = "not connected"
            else:
                session.terminate("kicked", ErrorCode.KICKED,
                                  "kicked by %s; retry-after=%d" % (actor, delay))
                result = "kicked session %s" % session.session_id
            log.info("subdomain=%s kick by %s: %s", name, actor, result)
            try:
                self.db.call(self.registry.kick_handled, kick_id, result)
            except RegistryError as exc:
                log.warning("cannot record a kick: %s", exc)

    def _check_takeovers(self):
        """End our session of a name that has a newer session on another gateway (the same
        agent key reconnected there), or whose row another gateway ended as stale."""
        mine = {name: s for name, s in self.sessions.items() if s.recorded}
        if not mine:
            return
        try:
            rows = self.db.call(self.registry.active_sessions_of, list(mine))
        except RegistryError as exc:
            log.warning("cannot check for takeovers: %s", exc)
            return
        active = {row.id for row in rows}
        for name, session in mine.items():
            if self.sessions.get(name) is not session:
                continue  # ended meanwhile
            newer = [row for row in rows if row.subdomain == name
                     and (row.started, row.id) > (session.started, session.session_id)]
            if newer:
                log.info("%s replaced by session %s on gateway %s", session.label,
                         newer[-1].id, newer[-1].gateway)
                session.terminate("replaced", ErrorCode.REPLACED,
                                  "replaced by a new connection on gateway %s" % newer[-1].gateway)
            elif session.session_id not in active:
                log.warning("%s was ended in the registry by another gateway (this one was "
                            "silent too long); closing it so the agent reconnects", session.label)
                session.terminate(REASON_STALE, ErrorCode.SHUTTING_DOWN,
                                  "session ended by the registry; reconnect")

    # ----- the gateways table ---------------------------------------------------------
    def _keep_alive(self):
        """Refresh our row so other gateways see us alive; end the sessions of those gone."""
        stale_after = self.config.gateway_stale_after
        period = max(1.0, min(GATEWAY_REFRESH, stale_after / 3.0))
        while True:
            gevent.sleep(period)
            self._announce()
            self._end_dead_gateways(stale_after)

    def _announce(self):
        """Queued like the session writes, so the refresh never overtakes them; one at a time."""
        if self._announcing:
            return  # the last one still waits behind slow writes
        self._announcing = True
        result = {}

        def refresh_gateway():
            result["previous"] = self.registry.gateway_seen(self.gateway_id, self.instance,
                                                            self.address)

        def done():
            self._announcing = False
            self._check_gateway_id(result.get("previous"))

        self.db.submit(refresh_gateway, (), after=done)

    def _check_gateway_id(self, previous):
        if previous is None or previous == self.instance:
            return
        log.error("gateway_id %s is also used by another server (instance %s); give every "
                  "server its own [server] gateway_id", self.gateway_id, previous)

    def _end_dead_gateways(self, stale_after):
        events = {}

        def deliveries_of(row):  # runs inside the registry's transaction; our hooks deliver
            events[row.id] = self._event(row, "disconnect", REASON_STALE)
            return self._deliveries(events[row.id])

        try:
            rows = self.db.call(self.registry.end_sessions_of_dead_gateways, self.gateway_id,
                                stale_after, deliveries_of)
        except RegistryError as exc:
            log.warning("cannot check for gateways that are gone: %s", exc)
            return
        for row in rows:
            log.warning("subdomain=%s session=%s ended reason=stale: gateway %s not seen for "
                        "%s s", row.subdomain, row.id, row.gateway, stale_after)
            signals.session_ended.send(self, event=events[row.id])

    def _prune_audit(self):
        try:
            removed = self.db.call(self.registry.prune_audit,
                                   time.time() - self.config.audit_retention)
        except RegistryError as exc:
            log.warning("cannot prune the audit trail: %s", exc)
            return
        if removed:
            log.info("pruned %d audit entries older than %s s", removed,
                     self.config.audit_retention)

    # ----- agents ---------------------------------------------------------------------
    def _accept_loop(self):
        while True:
            try:
                sock, address = self.listener.accept()
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                gevent.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            source = admission.source_of(address)
            refusal = self.admission.admit(source)
            if refusal is not None:
                log.info("agent=%s:%d refused before handshake: %s", address[0], address[1], refusal)
                gevent.spawn(_reject_and_close, sock, RejectCode.BUSY)
                continue
            gevent.spawn(self._handle_agent, sock, address, source)

    def _handle_agent(self, sock, address, source):
        peer = "%s:%d" % address[:2]
        timeout = self.config.handshake_timeout
        if self.admission.pending > self.admission.start:
            # Under pressure slow handshakes lose their slot sooner: an honest agent needs
            # two round trips, a flood's silent connections would hold the slot to the end.
            timeout = min(timeout, max(PRESSURE_HANDSHAKE_MIN, timeout / 4))
        progress = []  # what arrived: an agent that sent act one is no flood, only slow
        try:
            with gevent.Timeout(timeout, HandshakeTimeout):
                handshake, session, config = self._handshake(sock, peer, progress)
        except HandshakeTimeout:
            # An honest agent sends act one at once; if it came, the wait was ours or the
            # network's, and a penalty would lock its address out of the slots above START.
            penalty = 0 if progress else admission.PENALTY_TIMEOUT
            self._handshake_failed(sock, source, peer, "timeout",
                                   "timeout after act one" if progress else "timeout", penalty)
            return
        except noise.HandshakeError as exc:
            self._handshake_failed(sock, source, peer, exc.reason, exc, admission.PENALTY_JUNK)
            return
        except ProtocolError as exc:
            self._handshake_failed(sock, source, peer, "bad preamble or CONFIG", exc,
                                   admission.PENALTY_JUNK)
            return
        except OSError as exc:
            self._handshake_failed(sock, source, peer, "network", exc.strerror or exc, 0)
            return
        finally:
            self.admission.release(source)
        set_nodelay(sock)
        enable_keepalive(sock)
        key = handshake.remote_static.hex()
        session_id = handshake.handshake_hash[:8].hex()
        try:
            name, grant = self._authorize(config, key)
            agent_session = AgentSession(self, sock, session, name, key, grant, session_id, peer)
        except Refusal as exc:
            log.warning("agent=%s key=%s refused: %s (%s)", peer, crypto.fingerprint(key),
                        wire.code_name(exc.code), exc)
            self.admission.penalise(source, exc.penalty)
            self.counters.refused(exc.code)
            self._send_refusal(sock, session, exc)
            return
        self.admission.clear(source)
        agent_session.run()

    def _handshake(self, sock, peer, progress):
        preamble_bytes = recv_exact(sock, wire.PREAMBLE_SIZE)
        preamble = wire.parse_preamble(preamble_bytes)
        if preamble.version != wire.WIRE_VERSION:
            sock.sendall(wire.encode_reject(RejectCode.UNSUPPORTED_VERSION))
            raise ProtocolError("unsupported wire version %d" % preamble.version)
        handshake = noise.Responder(self.keys, wire.prologue(preamble_bytes))
        act_one = recv_exact(sock, noise.ACT_ONE_SIZE)
        try:
            act_two = handshake.read_act_one(act_one)
        except noise.HandshakeError as exc:
            if exc.reason == "act1 bad tag":  # made for another server key
                sock.sendall(wire.encode_reject(RejectCode.SERVER_KEY_MISMATCH))
            raise
        progress.append("act one")
        sock.sendall(act_two)
        handshake.read_act_three(recv_exact(sock, noise.ACT_THREE_SIZE))
        session = protocol.Session(protocol.SERVER, handshake.send_cipher, handshake.recv_cipher,
                                   window=self.config.stream_window,
                                   max_streams=self.config.max_streams,
                                   guard=protocol.FloodGuard(time.monotonic,
                                                             self.config.ping_limit,
                                                             self.config.flood_limit))
        events = []
        while not events:
            data = sock.recv(wire.MAX_CONFIG_SIZE + 64)
            if not data:
                raise ProtocolError("connection closed before CONFIG")
            events = session.receive_data(data)
        if len(events) != 1 or type(events[0]) is not protocol.ConfigReceived:
            raise ProtocolError("expected CONFIG alone, got %s" % [type(e).__name__ for e in events])
        return handshake, session, events[0].config

    def _handshake_failed(self, sock, source, peer, category, detail, penalty):
        """``category`` is a fixed string (a metric label); ``detail`` may hold peer bytes."""
        self.handshake_failures[category] = self.handshake_failures.get(category, 0) + 1
        log.info("agent=%s handshake failed: %s", peer, detail)
        self.admission.penalise(source, penalty)
        sock.close()

    def _authorize(self, config, key):
        """Name, then grant, then in-use: only a key holding the grant learns about its name."""
        if self.stopping:
            raise Refusal(ErrorCode.SHUTTING_DOWN, "server shutting down")
        try:
            name = names.validate_subdomain(config.get("subdomain"))
        except (names.InvalidName, TypeError, AttributeError) as exc:
            raise Refusal(ErrorCode.INVALID_NAME, "invalid subdomain: %s" % exc,
                          admission.PENALTY_AUTHFAIL) from None
        if self.grants is None:
            raise Refusal(ErrorCode.RESOURCE_SHORTAGE, "grants unavailable, retry later")
        grant = self.grants.get((name, key)) or self._fresh_grant(name, key)
        if grant is None:
            raise Refusal(ErrorCode.UNAUTHORIZED, "key %s has no grant for %r"
                          % (crypto.fingerprint(key), name), admission.PENALTY_AUTHFAIL)
        other = self._held_elsewhere(name, key)
        if other is not None:
            raise Refusal(ErrorCode.NAME_IN_USE, "%r is connected on gateway %s with another key"
                          % (name, other.gateway))
        current = self.sessions.get(name)
        if current is not None:
            if current.key != key:
                raise Refusal(ErrorCode.NAME_IN_USE, "%r is connected with another key" % name)
            current.terminate("replaced", ErrorCode.REPLACED, "replaced by a new connection")
            current.ended.wait(TAKEOVER_WAIT)
            if self.sessions.get(name) is not None:  # still closing, or another took it meanwhile
                raise Refusal(ErrorCode.NAME_IN_USE, "%r is still in use, retry" % name)
        return name, grant

    def _held_elsewhere(self, name, key):
        """Another gateway's active session of ``name`` with another key, or None.

        The same key may move (the other gateway sees our newer session and ends its own);
        another key must wait, as on one gateway. An unreadable registry lets the agent in.
        """
        try:
            rows = self.db.call(self.registry.active_sessions_of, [name])
        except RegistryError as exc:
            log.warning("cannot check other gateways' sessions of %s: %s", name, exc)
            return None
        return next((row for row in rows
                     if row.gateway != self.gateway_id and row.key != key), None)

    def _fresh_grant(self, name, key):
        """A grant made since the last poll: an agent started right after `grant` gets in."""
        try:
            grant = self.db.call(self.registry.find_grant, name, key)
        except RegistryError as exc:
            log.warning("cannot read grants: %s", exc)
            return None
        if grant is not None:
            self.grants[(name, key)] = grant
        return grant

    def _send_refusal(self, sock, session, refusal):
        session.refuse(refusal.code, str(refusal))
        try:
            sock.sendall(session.data_to_send())
        except OSError:
            pass
        sock.close()

    # ----- tunnel ports ---------------------------------------------------------------
    def bind_tunnel_port(self, name, grant):
        """Pinned port, else the name's last port when free, else a fresh one."""
        host = self.config.bind
        if grant.port:
            return _listen(host, grant.port)
        last = self.last_ports.get(name)
        if last is not None and self._in_range(last):
            try:
                return _listen(host, last)
            except OSError:
                pass
        if self.config.ports is None:
            return _listen(host, 0)
        low, high = self.config.ports
        for _ in range(PORT_ATTEMPTS):
            try:
                return _listen(host, random.randint(low, high))
            except OSError:
                continue
        for port in range(low, high + 1):  # small ranges: try them all before failing
            try:
                return _listen(host, port)
            except OSError:
                continue
        raise OSError("no free port in %d-%d" % (low, high))

    def _in_range(self, port):
        ports = self.config.ports
        return ports is None or ports[0] <= port <= ports[1]

    # ----- sessions -------------------------------------------------------------------
    def host_of(self, name):
        return "%s.%s" % (name, self.config.domain)

    def _event(self, row, kind, reason=""):
        return signals.SessionEvent(
            kind=kind, subdomain=row.subdomain, host=self.host_of(row.subdomain),
            listen_host=row.host, listen_port=row.port, agent_key=row.key,
            session_id=row.id, reason=reason, started=row.started)

    def _deliveries(self, event):
        """One outbox row per enabled hook, written with the session change."""
        return [(name, event.to_json()) for name in self.hook_names]

    def session_started(self, agent_session):
        row = agent_session.row()
        self.last_ports[row.subdomain] = row.port
        event = self._event(row, "connect")

        def recorded():
            agent_session.recorded = True  # from now on the takeover check may look for it
            signals.session_started.send(self, event=event)

        self.db.submit(self.registry.record_session_start, (row, self._deliveries(event)),
                       after=recorded)

    def session_ended(self, agent_session, reason):
        row = agent_session.row()
        event = self._event(row, "disconnect", reason)
        tunnel = agent_session.tunnel
        detail = "bytes_in=%d bytes_out=%d streams=%d" % (
            tunnel.bytes_up, tunnel.bytes_down, tunnel.streams_opened)
        self.db.submit(self.registry.record_session_end,
                       (row.id, reason, time.time(), self._deliveries(event), detail),
                       after=lambda: signals.session_ended.send(self, event=event))

    def active_session_events(self):
        """Connect events of this server's active sessions, as the registry holds them."""
        rows = self.db.call(self.registry.active_sessions, self.gateway_id)
        return [self._event(row, "connect") for row in rows if row.instance == self.instance]

    def over_budget(self):
        """Buffered tunnel bytes past 75% of memory_budget refuse new streams, until they
        fall below 50% (hysteresis, so the refusals do not flap)."""
        buffered = sum(s.tunnel.buffered for s in self.sessions.values())
        budget = self.config.memory_budget
        if self._over_budget:
            self._over_budget = buffered > budget * BUDGET_RESUME
        else:
            self._over_budget = buffered > budget * BUDGET_REFUSE
            if self._over_budget:
                log.warning("memory budget: %d bytes buffered (budget %d); refusing new "
                            "streams until it falls below half", buffered, budget)
        return self._over_budget

    def stats(self):
        return {
            "agents": len(self.sessions),
            "streams": sum(len(s.tunnel.pumps) for s in self.sessions.values()),
            "pending_handshakes": self.admission.pending,
            "penalty_table": self.admission.penalty_table_size,
            "handshake_failures": dict(self.handshake_failures),
            "greenlets": metrics.greenlet_counts()[0],  # live ones: the dead are garbage
        }


class AgentSession:
    """One connected agent: its tunnel port, its Tunnel and how it ended."""

    def __init__(self, server, sock, session, name, key, grant, session_id, remote):
        self.server = server
        self.subdomain = name
        self.key = key
        self.session_id = session_id
        self.remote = remote
        self.started = time.time()
        self.end_reason = None
        self.ended = gevent.event.Event()
        self.recorded = False  # our session row is committed
        self.refused_streams = 0  # clients reset at the stream limit
        self.budget_refusals = 0  # clients reset because the memory budget was reached
        self._refusal_logged = float("-inf")
        self._proxied = gevent.pool.Group()  # trusted proxies' connections reading their header
        self.label = "subdomain=%s agent=%s session=%s" % (name, crypto.fingerprint(key), session_id)
        try:
            self.listener = server.bind_tunnel_port(name, grant)
        except OSError as exc:
            log.error("%s no tunnel port: %s", self.label, exc)
            raise Refusal(ErrorCode.RESOURCE_SHORTAGE, "no free tunnel port") from None
        self.host, self.port = self.listener.getsockname()[:2]
        config = server.config
        self.tunnel = Tunnel(sock, session, label=self.label, ping_interval=config.ping_interval,
                             dead_after=config.dead_after,
                             write_stall_timeout=config.write_stall_timeout,
                             stream_idle_timeout=config.stream_idle_timeout,
                             on_event=self._on_event)
        self.open_rate = TokenBucket(config.open_rate, config.open_burst)
        session.accept({
            "subdomain": name, "host": server.host_of(name), "port": self.port,
            "window": config.stream_window, "max_streams": config.max_streams,
            "ping_interval": config.ping_interval, "features": [],
            "server": "diglett/%s" % __version__,
        })

    def row(self):
        return SessionRow(id=self.session_id, subdomain=self.subdomain, key=self.key,
                          host=self.host, port=self.port, remote=self.remote,
                          started=self.started, ended=None, state="active", reason=None,
                          instance=self.server.instance, gateway=self.server.gateway_id)

    def run(self):
        server = self.server
        server.sessions[self.subdomain] = self
        server.session_started(self)
        log.info("%s connected from %s, tunnel port %s:%d", self.label, self.remote,
                 self.host, self.port)
        self._accept = gevent.spawn(self._accept_clients)
        detail = "internal error"
        try:
            self.tunnel.start()
            detail = self.tunnel.wait()
        finally:  # whatever happened, the port closes and the session is recorded as ended
            self._accept.kill()
            self.listener.close()
            reason = self.end_reason or _classify(detail)
            if server.sessions.get(self.subdomain) is self:
                del server.sessions[self.subdomain]
            server.counters.session_closed(self)  # with the removal: no counter goes back
            server.session_ended(self, reason)
            self.ended.set()
        log.info("%s ended reason=%s (%s) after %.0f s, %d streams, %d bytes in, %d bytes out",
                 self.label, reason, detail, time.time() - self.started,
                 self.tunnel.streams_opened, self.tunnel.bytes_up, self.tunnel.bytes_down)

    def drain(self):
        """Take no new clients and tell the agent, but let the open streams finish."""
        self._accept.kill()
        self.listener.close()
        self.tunnel.session.goaway(ErrorCode.SHUTTING_DOWN, "server draining")
        self.tunnel.wake()

    def terminate(self, reason, code, message):
        if self.end_reason is None:
            self.end_reason = reason
        self.tunnel.close(reason, code, message)

    def _on_event(self, event):
        if type(event) is protocol.GoAwayReceived:
            self.tunnel.close("agent said goaway: %s %s" % (wire.code_name(event.code), event.reason))

    def _accept_clients(self):
        tunnel = self.tunnel
        while True:
            try:
                client, address = self.listener.accept()
            except OSError as exc:  # EMFILE and friends: keep the port, do not spin
                log.warning("%s accept failed: %s", self.label, exc)
                gevent.sleep(0.1)
                continue
            config = self.server.config  # read per client: SIGHUP may have changed the limits
            max_streams = config.max_streams
            self.open_rate.rate, self.open_rate.burst = config.open_rate, config.open_burst
            if len(tunnel.pumps) + len(self._proxied) >= max_streams:
                self.refused_streams += 1
                self._refuse_client(client, address, "stream limit %d reached" % max_streams,
                                    self.refused_streams)
                continue
            if self.server.over_budget():
                self.budget_refusals += 1
                self._refuse_client(client, address, "memory budget reached",
                                    self.budget_refusals)
                continue
            if config.proxy_trusted and _trusted(address, config.proxy_trusted):
                self._proxied.spawn(self._open_proxied, client, address)  # never block accept
                continue
            if not self._open_stream(client, address[:2], client.getsockname()[:2]):
                return

    def _refuse_client(self, client, address, why, count):
        """Reset at once (a proxy answers 502 instead of hanging); a flood logs once."""
        now = time.monotonic()
        if now - self._refusal_logged >= LIMIT_LOG_INTERVAL:
            self._refusal_logged = now
            log.warning("%s %s, refusing %s:%d (%d refused so far)",
                        self.label, why, address[0], address[1], count)
        close_with_rst(client)

    def _open_stream(self, client, remote, local):
        """OPEN a stream for ``client``, naming both its ends; False once stream ids run out."""
        tunnel = self.tunnel
        self.open_rate.take()
        set_nodelay(client)
        reset_unless_finished(client)
        try:
            stream_id = tunnel.session.open_stream({"remote": proxyproto.format_address(remote),
                                                    "local": proxyproto.format_address(local)})
        except ProtocolError:  # 2^32-1 streams in one session: let the agent reconnect
            close_with_rst(client)
            tunnel.close("stream ids exhausted", ErrorCode.NO_ERROR, "stream ids exhausted")
            return False
        tunnel.add_stream(stream_id, client)
        tunnel.send_soon()
        return True

    def _open_proxied(self, client, address):
        """A proxy_trusted source: its PROXY header names the real client, then the stream
        opens with that address; no valid header in time closes the connection, logged."""
        try:
            with gevent.Timeout(PROXY_HEADER_TIMEOUT, ProxyHeaderTimeout):
                header = read_proxy_header(client)
        except (proxyproto.HeaderError, ProxyHeaderTimeout, OSError) as exc:
            log.warning("%s proxy=%s closed: no valid PROXY header: %s", self.label,
                        proxyproto.format_address(address), exc)
            close_with_rst(client)
            return
        except gevent.GreenletExit:  # the session ended while the header was on its way
            close_with_rst(client)
            raise
        if self.listener.fileno() < 0:  # drained or ended meanwhile: take no new stream
            close_with_rst(client)
            return
        # LOCAL (the proxy's own health check) or no usable family: the real endpoints
        self._open_stream(client, header.source or address[:2],
                          header.destination or client.getsockname()[:2])


def read_proxy_header(sock):
    """The PROXY header that starts ``sock``, read without taking a byte of what follows."""
    data = b""
    while True:
        header = proxyproto.parse(data)
        if header is not None:
            return header
        chunk = sock.recv(proxyproto.wanted(data))
        if not chunk:
            raise ConnectionError("connection closed after %d bytes" % len(data))
        data += chunk


def _trusted(address, networks):
    """Is the source ``address`` in one of ``networks`` ([server] proxy_trusted)?"""
    ip = ipaddress.ip_address(address[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack listener's IPv4 client
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _classify(detail):
    if detail.startswith("peer silent"):
        return "dead"
    if detail.startswith("protocol error"):
        return "error"
    return "agent-left"


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listen(host, port):
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(ACCEPT_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _reject_and_close(sock, code):
    try:
        sock.sendall(wire.encode_reject(code))
    except OSError:
        pass
    sock.close()
