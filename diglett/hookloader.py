"""Hooks: which ones run (``[hooks] enabled``), their config sections, and the outbox delivery.

A hook is a ``diglett.hookapi.Hook`` (or a class with the same members, adapted here): its
methods are named after the signals (``session_started``, ``session_ended``) and take one
``diglett.signals.SessionEvent``; it declares its options in ``OPTIONS`` (docs/hooks.md).
Hooks never run in the tunnel's greenlets: the server queues one outbox row per hook with each session change (same transaction), the
blinker signals only wake the Dispatcher of each hook, and the Dispatcher calls the hook in its
own guarded greenlet, per subdomain in order, retrying with backoff until it works or the
delivery is declared dead. A hook that mirrors the whole state (``mirrors_state``, the
Traefik REST hook) gets one ``sync`` call for every delivery pending at once instead: a burst
of N events costs one publication, not N. When several servers share the registry, each
one's dispatchers deliver only the outbox rows of its own gateway.
"""

import importlib
import logging
import time
from importlib import metadata

import gevent
import gevent.event
import gevent.pool

from diglett import config, hookapi, signals
from diglett.registry import RegistryError

log = logging.getLogger(__name__)

BUILTIN = {  # name in [hooks] enabled -> module defining HOOK
    "script": "diglett.hooks.script",
    "traefik": "diglett.hooks.traefik",
    "traefik-etcd": "diglett.hooks.traefik_etcd",
    "webhook": "diglett.hooks.webhook",
}
ENTRY_POINT_GROUP = "diglett.hooks"  # third-party hooks: name = "package.module:Class"
POLL_INTERVAL = 1.0  # seconds between outbox scans when no signal wakes the dispatcher
CALL_GRACE = 5.0  # seconds a hook call may overrun the hook's own timeout before it is killed
PARALLEL_SUBDOMAINS = 16  # deliveries of one hook in flight at once (one per subdomain)
OUTBOX_SCAN = 500  # pending rows one scan reads (per-event hooks)
MIRROR_BATCH = 10000  # pending rows one sync of a mirrors_state hook settles at most
RESCAN_MAX = 30.0  # seconds a mirrors_state hook waiting for a retry goes without a scan
LOG_EACH = 10  # a failed sync of at most this many deliveries logs a line for each
RETRY_FIRST = 1.0  # seconds before the first retry, then doubling up to [hooks] retry_max
OUTBOX_KEEP = 7 * 86400  # seconds finished (done or dead) deliveries stay visible
PRUNE_INTERVAL = 3600  # seconds between prunes of the outbox

_OPTION_TYPES = {  # the option types a hook may declare, and their config parsers
    "string": config.string,
    "secret": config.string,
    "list": config.string_list,
    "boolean": config.boolean,
    "seconds": config.seconds(),
    "integer": config.integer(0),
    "path": config.path,
}

HOOKS_SECTION = config.Section({
    "enabled": config.Key(config.string_list, "", "hooks to run, in order (script, traefik, "
                          "webhook, or an installed third-party hook)"),
    "retry_max": config.Key(config.seconds(), "30", "longest delay between retries"),
    "max_attempts": config.Key(config.integer(0), "0",
                               "attempts before a delivery is dead (0: no limit, max_age only)"),
    "max_age": config.Key(config.seconds(), "86400", "seconds before a delivery is dead"),
})


class HookError(Exception):
    """A hook that cannot be loaded or configured; the message says what to fix."""


def available():
    """name -> loader of every hook class: built-in ones and installed entry points."""
    found = {name: (lambda module=module: importlib.import_module(module).HOOK)
             for name, module in BUILTIN.items()}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.load)
    return found


def config_sections():
    """{name: config.Section} of [hooks] and every installed hook's [hook:NAME], built from
    each hook class's OPTIONS: what config.load_server takes as ``extra_sections``."""
    sections = {"hooks": HOOKS_SECTION}
    for name, load in available().items():
        try:
            hook_class = load()
        except Exception as exc:  # a broken third-party package must not stop the server
            log.warning("hook %s cannot be imported: %s", name, exc)
            continue
        sections["hook:" + name] = config.Section(_keys_of(name, hook_class.OPTIONS))
    return sections


def _keys_of(name, options):
    keys = {}
    for option, (kind, default, doc) in options.items():
        parse = _OPTION_TYPES.get(kind)
        if parse is None:
            raise HookError("hook %s declares option %s of unknown type %r" % (name, option, kind))
        keys[option] = config.Key(parse, default, doc, secret=kind == "secret")
    return keys


def build(cfg, context):
    """The enabled hooks, configured, in order: [(name, hookapi.Hook)]."""
    loaders = available()
    hooks = []
    for name in cfg.sections["hooks"]["enabled"]:
        if name not in loaders:
            raise HookError("%s: [hooks] enabled names %r, which is not installed (known: %s)"
                            % (cfg.path, name, ", ".join(sorted(loaders))))
        options = cfg.sections.get("hook:" + name, {})
        hook_class = loaders[name]()
        for option, (kind, default, doc) in hook_class.OPTIONS.items():
            if default is None and option not in options:
                raise HookError("%s: hook %s is enabled but [hook:%s] has no %s (%s); add it"
                                % (cfg.path, name, name, option, doc))
        try:
            hooks.append((name, hookapi.as_hook(hook_class(options, context))))
        except HookError:
            raise
        except Exception as exc:
            raise HookError("%s: [hook:%s]: %s" % (cfg.path, name, exc)) from exc
    return hooks


def sections_of(cfg):
    """The config's hook sections as plain dicts: a reload restarts the hooks if they differ."""
    return {name: dict(values) for name, values in cfg.sections.items()
            if name == "hooks" or name.startswith("hook:")}


class Hooks:
    """Runs one Dispatcher per enabled hook and wakes them when a session changes."""

    def __init__(self, hooks, registry, db, settings, gateway=None):
        """``gateway``: deliver only that gateway's outbox rows (None: every row)."""
        self.dispatchers = [Dispatcher(name, hook, registry, db, settings, gateway)
                            for name, hook in hooks]
        self.names = [name for name, _ in hooks]
        self._receivers = []
        self._pruner = None

    def start(self):
        for dispatcher in self.dispatchers:
            dispatcher.start()

        def wake(sender, **extra):  # blinker: never raise into the sender
            for dispatcher in self.dispatchers:
                dispatcher.wake()

        self._receivers.append(wake)
        signals.session_started.connect(wake, weak=False)
        signals.session_ended.connect(wake, weak=False)
        signals.session_updated.connect(wake, weak=False)
        if self.dispatchers:
            self._pruner = gevent.spawn(self._prune_loop)

    def wake(self):
        """Look at the outbox now (a worker process committed a session change)."""
        for dispatcher in self.dispatchers:
            dispatcher.wake()

    def _prune_loop(self):
        """Finished deliveries are kept OUTBOX_KEEP seconds for operators, then forgotten."""
        registry, db = self.dispatchers[0].registry, self.dispatchers[0].db
        while True:
            try:
                removed = db.call(registry.prune_deliveries, time.time() - OUTBOX_KEEP)
                if removed:
                    log.info("pruned %d finished hook deliveries", removed)
            except RegistryError as exc:
                log.warning("cannot prune the hook outbox: %s", exc)
            gevent.sleep(PRUNE_INTERVAL)

    def stop(self, timeout):
        """Let queued deliveries finish for up to ``timeout`` seconds, then stop."""
        deadline = time.monotonic() + timeout
        if self._pruner is not None:
            self._pruner.kill()
        for dispatcher in self.dispatchers:
            dispatcher.wake()
        while time.monotonic() < deadline and any(d.has_work() for d in self.dispatchers):
            gevent.sleep(0.05)
        for receiver in self._receivers:
            signals.session_started.disconnect(receiver)
            signals.session_ended.disconnect(receiver)
            signals.session_updated.disconnect(receiver)
        for dispatcher in self.dispatchers:
            dispatcher.stop()


class Dispatcher:
    """Delivers one hook's outbox: in order per subdomain, retried, never on the data path."""

    def __init__(self, name, hook, registry, db, settings, gateway=None):
        self.name = name
        self.gateway = gateway
        self.hook = hook
        self.registry = registry
        self.db = db
        self.retry_max = settings["retry_max"]
        self.max_attempts = settings["max_attempts"]
        self.max_age = settings["max_age"]
        self.delivered = 0
        self.failed = 0
        self.dead = 0
        self._wake = gevent.event.Event()
        self._in_flight = {}  # subdomain -> greenlet
        self._syncing = None  # the greenlet of a mirrors_state hook's sync in flight
        self._rescan_at = 0.0  # a mirrors_state hook's rows all wait for their retry until then
        self._sync_failures = 0  # a mirrors_state hook's syncs failed in a row
        self._pool = gevent.pool.Pool(PARALLEL_SUBDOMAINS)
        self._loop = None

    def has_work(self):
        """A delivery in flight or queued (read from the outbox, not from the last scan)."""
        if self._in_flight or self._syncing is not None:
            return True
        try:
            return bool(self.db.call(self.registry.pending_deliveries, self.name, 1,
                                     self.gateway))
        except RegistryError:
            return False

    def start(self):
        _guarded(self.name, "start", self.hook.start)
        self._loop = gevent.spawn(self._run)

    def stop(self):
        if self._loop is not None:
            self._loop.kill()
        self._pool.kill()
        _guarded(self.name, "stop", self.hook.stop)

    def wake(self):
        self._wake.set()

    def _run(self):
        mirror = self.hook.mirrors_state
        while True:
            woken = self._wake.wait(POLL_INTERVAL)
            self._wake.clear()
            if self._syncing is not None:
                continue  # the sync in flight wakes us when it is done
            if mirror and not woken and time.time() < self._rescan_at:
                continue  # every pending row waits for its retry: no need to read them all
            try:
                pending = self.db.call(self.registry.pending_deliveries, self.name,
                                       MIRROR_BATCH if mirror else OUTBOX_SCAN, self.gateway)
            except RegistryError as exc:
                log.warning("hook=%s cannot read its outbox: %s", self.name, exc)
                continue
            if mirror:
                self._start_sync(pending, time.time())
            else:
                self._start_due(pending, time.time())

    # ----- a hook that mirrors the whole state: one sync for every pending delivery ---------
    def _start_sync(self, pending, now):
        """One sync settles every pending delivery (due or waiting for its retry: the state it
        publishes covers them all), once one of them is due."""
        self._rescan_at = 0.0
        if self._syncing is not None or not pending:
            return
        if any(row.next_attempt <= now for row in pending):
            self._syncing = self._pool.spawn(self._sync, pending)
        else:  # a new event wakes us sooner
            self._rescan_at = min(min(row.next_attempt for row in pending), now + RESCAN_MAX)

    def _sync(self, rows):
        try:
            error = self._call_sync(rows)
            if error is None:
                self.delivered += len(rows)
                self._sync_failures = 0
                self.db.call(self.registry.settle_deliveries, [row.id for row in rows])
            else:
                self._sync_failed(rows, error)
        except RegistryError as exc:
            log.warning("hook=%s cannot update its outbox: %s", self.name, exc)
        finally:
            self._syncing = None
            self.wake()

    def _call_sync(self, rows):
        """One ``sync`` for ``rows`` (oldest first); None when it worked, else why not."""
        events = [signals.SessionEvent.from_json(row.payload) for row in rows]
        limit = self.hook.timeout + CALL_GRACE
        try:
            with gevent.Timeout(limit, HookError("no answer after %.0f s" % limit)):
                self.hook.sync(events)
        except Exception as exc:  # the hook's failure is data here, not our crash
            return str(exc) or type(exc).__name__
        kinds = {}
        for row in rows:
            kinds[row.kind] = kinds.get(row.kind, 0) + 1
        log.info("hook=%s synced: %d deliveries (%s), last event %s", self.name, len(rows),
                 ", ".join("%d %s" % (n, kind) for kind, n in sorted(kinds.items())),
                 rows[-1].event_id)
        return None

    def _sync_failed(self, rows, error):
        """Every row of the sync failed together: retried together, after a backoff that
        grows with the syncs failed in a row (a new event still syncs at once); each row
        dies by its own attempts and age."""
        self.failed += len(rows)
        self._sync_failures += 1
        now = time.time()
        attempt = self._sync_failures
        delay = min(self.retry_max, RETRY_FIRST * 2 ** min(attempt - 1, 20))
        failed = []
        for row in rows:
            attempts = row.attempts + 1
            dead = bool(self.max_attempts and attempts >= self.max_attempts
                        or now - row.created >= self.max_age)
            failed.append((row.id, attempts, dead))
        dead = sum(1 for _, _, is_dead in failed if is_dead)
        self.dead += dead
        if len(rows) <= LOG_EACH:  # the per-delivery lines an operator greps for a name
            for row, (_, attempts, is_dead) in zip(rows, failed):
                if is_dead:
                    log.error("hook=%s subdomain=%s %s is dead after %d attempts: %s",
                              self.name, row.subdomain, row.kind, attempts, error)
                else:
                    log.warning("hook=%s subdomain=%s %s failed (attempt %d, retry in %.0f s): "
                                "%s", self.name, row.subdomain, row.kind, attempts, delay, error)
        else:
            if dead:
                log.error("hook=%s %d deliveries are dead after failed syncs: %s", self.name,
                          dead, error)
            log.warning("hook=%s sync of %d deliveries failed (attempt %d, retry in %.0f s): "
                        "%s", self.name, len(rows), attempt, delay, error)
        self.db.call(self.registry.settle_deliveries, (), failed, now + delay, error)

    # ----- per-event hooks: in order per subdomain -------------------------------------------

    def _start_due(self, pending, now):
        heads = {}
        disconnected = {row.session for row in pending
                        if row.kind == signals.EventKind.DISCONNECT}
        for row in pending:  # oldest first: the head of each subdomain goes first
            heads.setdefault(row.subdomain, row)
        for subdomain, row in heads.items():
            if subdomain in self._in_flight or row.next_attempt > now or self._pool.full():
                continue
            skip = (self.hook.skip_ended_connects and row.session in disconnected
                    and row.kind in (signals.EventKind.CONNECT, signals.EventKind.UPDATE))
            self._in_flight[subdomain] = self._pool.spawn(self._deliver, row, skip)

    def _deliver(self, row, skip):
        try:
            if skip:  # its disconnect is already queued: nothing to publish any more
                log.info("hook=%s subdomain=%s skipped connect of ended session %s",
                         self.name, row.subdomain, row.session)
                self.db.call(self.registry.delivery_done, row.id)
                return
            error = self._call(row)
            if error is None:
                self.delivered += 1
                self.db.call(self.registry.delivery_done, row.id)
            else:
                self._failed(row, error)
        except RegistryError as exc:
            log.warning("hook=%s cannot update its outbox: %s", self.name, exc)
        finally:
            del self._in_flight[row.subdomain]
            self.wake()

    def _call(self, row):
        """Run the hook method; None when it worked, else why not."""
        event = signals.SessionEvent.from_json(row.payload)
        method = signals.method_of(row.kind)
        limit = self.hook.timeout + CALL_GRACE
        try:
            with gevent.Timeout(limit, HookError("no answer after %.0f s" % limit)):
                getattr(self.hook, method)(event)
        except Exception as exc:  # the hook's failure is data here, not our crash
            return str(exc) or type(exc).__name__
        log.info("hook=%s subdomain=%s %s delivered (event %s)", self.name, row.subdomain,
                 row.kind, row.event_id)
        return None

    def _failed(self, row, error):
        self.failed += 1
        attempts = row.attempts + 1
        now = time.time()
        dead = (self.max_attempts and attempts >= self.max_attempts
                or now - row.created >= self.max_age)
        delay = min(self.retry_max, RETRY_FIRST * 2 ** min(attempts - 1, 20))
        if dead:
            self.dead += 1
            log.error("hook=%s subdomain=%s %s is dead after %d attempts: %s",
                      self.name, row.subdomain, row.kind, attempts, error)
        else:
            log.warning("hook=%s subdomain=%s %s failed (attempt %d, retry in %.0f s): %s",
                        self.name, row.subdomain, row.kind, attempts, delay, error)
        self.db.call(self.registry.delivery_failed, row.id, attempts, now + delay, error, dead)


def _guarded(name, what, function):
    try:
        function()
    except Exception:
        log.exception("hook=%s %s failed", name, what)
