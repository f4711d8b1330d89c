"""The master process of a diglett-server with ``workers > 1``: the parts that exist once.

It owns the listening sockets (the agent port, listen_tls, listen_ws: diglett.workers passes
their connections on; the agent port goes into systemd's fd store as a single server's does),
the HTTP API (answered from the workers: diglett.masterapi), the hooks, and the workers'
lifecycle: SIGTERM and SIGHUP fan out to them, and one that exits is started again.

Hooks run here only, one Dispatcher per hook over the outbox rows of every worker, so a hook
that renders the whole state (the Traefik REST hook) has one writer, not one per worker. Its
``active_sessions`` are the workers' active rows in the registry.
"""

import logging
import shutil
import signal
import tempfile
import time
import uuid

from diglett import config, crypto, handoff, hookloader, masterapi
from diglett.cli import logs
from diglett.dbworker import DatabaseWorker
from diglett.gateway import listener as agent_listener
from diglett.gateway.events import SessionEvents
from diglett.gateway.fleet import GRANT_POLL_INTERVAL, GrantCache
from diglett.gateway.ports import listen
from diglett.httpapi import make_app, make_server
from diglett.reach import certificate
from diglett.registry import Registry
from diglett.signals import EventKind
from diglett.workers import WorkerPool

log = logging.getLogger(__name__)

WORKERS_READY = 30  # seconds the workers have to start before the server gives up


class MasterGateway:
    """Has the members cli.server's main uses of a single-process Gateway."""

    def __init__(self, cfg, context, hook_objects, load, log_level_flag=None):
        """``load()`` re-reads the config and builds its hooks, for a reload."""
        self.cfg = cfg
        self.load = load
        self.log_level_flag = log_level_flag
        self.registry = Registry(cfg.database, create_dirs=True)  # migrated before workers
        self.db = DatabaseWorker()
        self.fdstore = handoff.FdStore()
        self.public_key = crypto.public_hex(crypto.load_or_create_private_key(cfg.key))
        if cfg.listen_tls is not None:
            certificate.files(cfg)  # made once here, not raced by the workers
        self.sockets = self._listen()
        self.agent_address = self.sockets[handoff.AGENTS].getsockname()[:2]
        self.rundir = tempfile.mkdtemp(prefix="diglett-workers-")  # 0700
        self.pool = WorkerPool(cfg, self.agent_address, self.rundir, self._wake,
                               log_level_flag)
        self.gateway_ids = self.pool.gateway_ids()
        self.events = SessionEvents(self.db, self.registry, cfg.domain, cfg.gateway_id,
                                    uuid.uuid4().hex)
        self.grants = GrantCache(self.db, self.registry)
        self.events.policy_of = self.grants.policy_of
        self._grants_read = 0.0
        self.hooks = None
        self.hooks = self._start_hooks(cfg, context, hook_objects)
        address = "%s:%d" % self.agent_address
        self.view = masterapi.MasterView(cfg, self.public_key, self.agent_address[1], address,
                                         self.db, self.registry, self.pool)
        app = make_app(self.view, lambda: self.hooks,
                       masterapi.make_registry(self.pool, lambda: self.hooks))
        self.http = make_server(cfg.http, app)
        try:
            self.http.init_socket()  # a taken http address fails before any worker starts
            self.pool.start(WORKERS_READY)
        except BaseException:
            self.pool.stop()
            self.hooks.stop(0)
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise
        for kind, sock in self.sockets.items():
            self.pool.accept(sock, kind)
        self.http.start()

    @property
    def doors(self):
        return ()  # the tunnel ports are the workers'; none of them goes into the fd store

    def _listen(self):
        """The agent port and the transport listeners, the last run's where they were passed
        on (the fd store), each stored for the next run."""
        cfg = self.cfg
        wanted = [(handoff.AGENTS, handoff.AGENTS, cfg.listen),
                  ("tls", handoff.transport_name("tls"), cfg.listen_tls),
                  ("ws", handoff.transport_name("ws"), cfg.listen_ws)]
        passed = {name: self.fdstore.take(name) for _, name, _ in wanted}
        self.fdstore.close_unused()  # tunnel ports of a single-process run: not ours now
        sockets = {}
        for kind, name, address in wanted:
            if address is None:
                continue
            inherited = passed[name]
            sock = inherited if agent_listener._serves(inherited, address) else listen(*address)
            self.fdstore.keep(sock, name, inherited)
            sockets[kind] = sock
            if kind != handoff.AGENTS:
                log.info("agents over %s on %s:%d", kind, *sock.getsockname()[:2])
        return sockets

    def _start_hooks(self, cfg, context, hook_objects):
        context.active_sessions = self.active_session_events
        hooks = hookloader.Hooks(hook_objects, self.registry, self.db, cfg.sections["hooks"],
                                 gateway=self.gateway_ids)
        hooks.start()
        self.events.hook_names = tuple(hooks.names)
        return hooks

    def _wake(self):
        if self.hooks is not None:
            self.hooks.wake()

    def active_session_events(self):
        """Connect events of every worker's active sessions, as the registry holds them."""
        if time.monotonic() - self._grants_read > GRANT_POLL_INTERVAL:
            self._grants_read = time.monotonic()
            self.grants.reload()  # for the policies the events carry
        rows = self.db.call(self.registry.active_sessions)
        return [self.events.event(row, EventKind.CONNECT) for row in rows
                if row.gateway in self.gateway_ids]

    def reload(self):
        """SIGHUP: the master takes the hooks' changes, each worker the rest."""
        try:
            cfg, context, hook_objects = self.load()
        except (config.ConfigError, hookloader.HookError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        for key in config.restart_keys():
            if getattr(cfg, key) != getattr(self.cfg, key):
                log.warning("reload: %s changed in %s; it takes effect after a restart", key,
                            cfg.path)
        logs.set_level(self.log_level_flag or cfg.log_level)
        if hookloader.sections_of(cfg) != hookloader.sections_of(self.cfg):
            self.hooks.stop(0)
            self.hooks = self._start_hooks(cfg, context, hook_objects)
            log.info("reload: hooks now %s", ", ".join(self.hooks.names) or "(none)")
        self.cfg = cfg
        self.pool.signal_all(signal.SIGHUP)
        log.info("reloaded %s (and told %d workers)", cfg.path, len(self.pool.workers))

    def stop(self):
        log.info("stopping: draining %d workers", len(self.pool.workers))
        self.pool.stop_accepting()
        for sock in self.sockets.values():
            sock.close()  # the fd store keeps its copy of the agent port
        self.pool.stop()
        self.hooks.wake()  # the workers' last session ends
        self.hooks.stop(self.cfg.shutdown_timeout)
        self.http.stop(timeout=1)
        self.db.drain(1)
        self.registry.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("stopped")
