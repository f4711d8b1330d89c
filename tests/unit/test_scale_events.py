"""Cost per event independent of the number of agents (issue 14), in process: a hook that
mirrors the state gets one sync for a burst of deliveries (settled, failed and retried
together, events in order); the Traefik hook reads every page of Traefik's routers and knows
from its anchor when a PUT was applied; the registry's change counters move with every write
of grants and sessions (on PostgreSQL too: tests/e2e/test_registry_postgresql.py), and the
server's once-a-second poll reads the grants, or looks for takeovers, only when they moved;
queued writes go in one transaction, and one by one again (in order) when that fails."""

import http.server
import json
import sqlite3
import threading
import time
import types
import urllib.parse

import pytest

from diglett import crypto, hookapi, hookloader
from diglett.dbworker import DatabaseWorker
from diglett.gateway.fleet import GrantCache, RegistryPoller
from diglett.registry import Registry, RegistryError
from diglett.signals import EventKind, SessionEvent
from tests.support.records import InlineDb
from tests.support.records import session as session_row

pytestmark = pytest.mark.timeout(30)
K1 = crypto.public_hex(crypto.generate_private_key())
K2 = crypto.public_hex(crypto.generate_private_key())
SETTINGS = {"retry_max": 30, "max_attempts": 0, "max_age": 3600}


@pytest.fixture
def registry(tmp_path):
    reg = Registry(str(tmp_path / "registry.db"))
    yield reg
    reg.close()


class Mirror(hookapi.Hook):
    """A mirrors_state hook that records each sync's events, failing the first ``fail``."""

    mirrors_state = True

    def __init__(self, fail=0):
        super().__init__({}, None)
        self.syncs = []
        self.fail = fail

    def sync(self, events):
        self.syncs.append([(e.subdomain, e.kind, e.session_id) for e in events])
        if self.fail:
            self.fail -= 1
            raise RuntimeError("Traefik is down")

    def session_started(self, event):
        raise AssertionError("a mirrors_state hook gets sync(), not the event methods")

    session_ended = session_updated = session_started


def queue(registry, hook, rows, kind=EventKind.CONNECT):
    """One outbox row for ``hook`` per session row (a start, or an end of a started one)."""
    for row in rows:
        event = SessionEvent(kind=kind, subdomain=row.subdomain, host=row.subdomain + ".x",
                             listen_host=row.host, listen_port=row.port, agent_key=row.key,
                             session_id=row.id)
        if kind == EventKind.CONNECT:
            registry.record_session_start(row, [(hook, event.to_json())])
        else:
            registry.record_session_end(row.id, "agent-left", row.started + 1,
                                        [(hook, event.to_json())])


def rows(count, prefix="n", start=0):
    return [session_row("%016x" % (start + i), subdomain="%s%d" % (prefix, i), key=K1,
                        port=30000 + start + i, started=1000.0 + start + i)
            for i in range(count)]


def dispatch_once(dispatcher, registry, now=None):
    pending = registry.pending_deliveries(dispatcher.name, hookloader.MIRROR_BATCH)
    dispatcher._start_sync(pending, time.time() if now is None else now)
    dispatcher._pool.join(timeout=10)
    return pending


# ----- coalesced deliveries ------------------------------------------------------------------
def test_a_burst_of_50_deliveries_is_one_sync_and_all_are_done(registry):
    hook = Mirror()
    queue(registry, "mirror", rows(50))
    dispatcher = hookloader.Dispatcher("mirror", hook, registry, InlineDb(), SETTINGS)
    dispatch_once(dispatcher, registry)
    assert len(hook.syncs) == 1 and len(hook.syncs[0]) == 50
    assert registry.pending_deliveries("mirror") == []
    assert dispatcher.delivered == 50
    done = [e for e in registry.audit_entries() if e.action == "hook-done"]
    assert len(done) == 50  # each delivery's outcome is in the audit trail, as before


def test_a_failed_sync_fails_every_row_and_they_are_retried_together(registry):
    hook = Mirror(fail=1)
    queue(registry, "mirror", rows(50))
    dispatcher = hookloader.Dispatcher("mirror", hook, registry, InlineDb(), SETTINGS)
    dispatch_once(dispatcher, registry)
    pending = registry.pending_deliveries("mirror")
    assert len(pending) == 50 and {row.attempts for row in pending} == {1}
    assert len({row.next_attempt for row in pending}) == 1  # one retry time for all
    assert {row.last_error for row in pending} == {"Traefik is down"}
    failed = [e for e in registry.audit_entries() if e.action == "hook-failed"]
    assert len(failed) == 50
    dispatch_once(dispatcher, registry)  # not due yet: nothing happens
    assert len(hook.syncs) == 1
    dispatch_once(dispatcher, registry, now=pending[0].next_attempt + 0.01)
    assert len(hook.syncs) == 2 and len(hook.syncs[1]) == 50
    assert registry.pending_deliveries("mirror") == []


def test_a_new_event_syncs_at_once_and_settles_the_rows_waiting_for_their_retry(registry):
    hook = Mirror(fail=1)
    queue(registry, "mirror", rows(5))
    dispatcher = hookloader.Dispatcher("mirror", hook, registry, InlineDb(), SETTINGS)
    dispatch_once(dispatcher, registry)
    queue(registry, "mirror", rows(1, prefix="late", start=100))  # due now
    dispatch_once(dispatcher, registry)
    assert [len(sync) for sync in hook.syncs] == [5, 6]  # the state covers all six
    assert registry.pending_deliveries("mirror") == []


def test_a_sync_gets_the_events_in_order_per_subdomain(registry):
    hook = Mirror()
    first, = rows(1, prefix="foo")
    queue(registry, "mirror", [first])
    queue(registry, "mirror", [first], kind=EventKind.DISCONNECT)
    second = session_row("%016x" % 99, subdomain="foo0", key=K1, port=30099, started=2000.0)
    queue(registry, "mirror", [second] + rows(1, prefix="bar", start=50))
    dispatcher = hookloader.Dispatcher("mirror", hook, registry, InlineDb(), SETTINGS)
    dispatch_once(dispatcher, registry)
    foo = [(kind, session) for name, kind, session in hook.syncs[0] if name == "foo0"]
    assert foo == [("connect", first.id), ("disconnect", first.id), ("connect", second.id)]


def test_rows_die_by_their_own_attempts_when_syncs_keep_failing(registry):
    hook = Mirror(fail=5)
    queue(registry, "mirror", rows(3))
    settings = dict(SETTINGS, max_attempts=2)
    dispatcher = hookloader.Dispatcher("mirror", hook, registry, InlineDb(), settings)
    dispatch_once(dispatcher, registry)
    queue(registry, "mirror", rows(1, prefix="new", start=10))
    later = registry.pending_deliveries("mirror")[0].next_attempt + 0.01
    dispatch_once(dispatcher, registry, now=later)
    assert [len(sync) for sync in hook.syncs] == [3, 4]
    left = registry.pending_deliveries("mirror")
    assert [row.subdomain for row in left] == ["new0"]  # the three old rows are dead
    assert dispatcher.dead == 3
    assert len(registry.deliveries(state="dead")) == 3


def test_a_per_event_hook_still_gets_one_call_per_delivery(registry):
    calls = []

    class PerEvent(hookapi.Hook):
        def session_started(self, event):
            calls.append(event.subdomain)

        def session_ended(self, event):
            calls.append(event.subdomain)

    queue(registry, "script", rows(3))
    dispatcher = hookloader.Dispatcher("script", PerEvent({}, None), registry, InlineDb(),
                                       SETTINGS)
    dispatcher._start_due(registry.pending_deliveries("script"), time.time())
    dispatcher._pool.join(timeout=10)
    assert sorted(calls) == ["n0", "n1", "n2"]


def test_an_adapted_hook_may_mirror_the_state_too():
    class Old:
        mirrors_state = True

        def __init__(self):
            self.synced = []

        def sync(self, events):
            self.synced.append(len(events))

        def session_started(self, event):
            pass

        def session_ended(self, event):
            pass

    inner = Old()
    hook = hookapi.as_hook(inner)
    assert hook.mirrors_state is True
    hook.sync([1, 2])
    assert inner.synced == [2]
    assert hookapi.as_hook(types.SimpleNamespace(session_started=None, session_ended=None)) \
        .mirrors_state is False


# ----- the Traefik hook against a stand-in for Traefik's API --------------------------------------
class FakeTraefik:
    """Traefik's REST provider and the parts of its API the hook reads: PUTs are applied
    after ``delay`` seconds, routers are served in pages (default 100, as Traefik does)."""

    def __init__(self, delay=0.0):
        self.puts = []
        self.config = {}
        self.delay = delay
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.puts.append(body)
                threading.Timer(outer.delay, outer.apply, (body,)).start()
                self.answer(200, b"")

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/api/http/middlewares/diglett-anchor@rest":
                    anchor = outer.config.get("http", {}).get("middlewares", {}).get(
                        "diglett-anchor")
                    if anchor is None:
                        return self.answer(404, b"404 page not found")
                    return self.answer(200, json.dumps(anchor).encode())
                if url.path == "/api/http/routers":
                    routers = [{"name": name + "@rest", "status": "enabled", **router}
                               for name, router in sorted(
                                   outer.config.get("http", {}).get("routers", {}).items())]
                    size, page = int(query.get("per_page", 100)), int(query.get("page", 1))
                    chunk = routers[(page - 1) * size:page * size]
                    following = page + 1 if page * size < len(routers) else 1
                    return self.answer(200, json.dumps(chunk).encode(),
                                       {"X-Next-Page": str(following)})
                self.answer(404, b"404 page not found")

            def answer(self, status, body, headers=None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.api = "http://127.0.0.1:%d" % self.server.server_address[1]

    def apply(self, body):
        self.config = body

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def traefik_events(count):
    return [SessionEvent(kind="connect", subdomain="n%d" % i, host="n%d.example.test" % i,
                         listen_host="127.0.0.1", listen_port=30000 + i, agent_key=K1,
                         session_id="%016x" % i) for i in range(count)]


def rest_hook(api, sessions):
    from diglett.hooks.traefik import TraefikHook

    options = {"api": api, "upstream_host": "", "entrypoints": [], "cert_resolver": "",
               "middlewares": [], "mode": "http", "reuse_connections": True,
               "check_interval": 5, "settle": 5, "timeout": 5}
    return TraefikHook(options, hookapi.HookContext("example.test",
                                                    active_sessions=lambda: sessions))


def test_one_sync_is_one_put_and_every_page_of_routers_is_read():
    traefik = FakeTraefik(delay=0.3)
    try:
        sessions = traefik_events(2500)  # 25 of Traefik's default pages, 3 of the hook's
        hook = rest_hook(traefik.api, sessions)
        hook.sync(sessions)
        assert len(traefik.puts) == 1
        assert len(traefik.puts[0]["http"]["routers"]) == 2500
        assert len(hook._routers("http")) == 2500
        assert hook.out_of_step() is False and hook.out_of_step(full=False) is False
        traefik.config = {}  # Traefik restarted: it forgot the REST configuration
        assert hook.out_of_step(full=False) is True  # told by the anchor alone
    finally:
        traefik.close()


def test_a_router_traefik_drops_fails_the_sync_once_the_put_is_applied():
    traefik = FakeTraefik()
    original = traefik.apply
    traefik.apply = lambda body: original(json.loads(json.dumps(body).replace(
        '"diglett-n1"', '"dropped"')))  # Traefik serves the PUT without router n1
    try:
        hook = rest_hook(traefik.api, traefik_events(3))
        hook.settle = 1
        with pytest.raises(Exception, match="diglett-n1: missing"):
            hook.sync()
    finally:
        traefik.close()


# ----- change counters ------------------------------------------------------------------------
def test_the_counters_move_with_every_write_of_their_table(registry, tmp_path):
    start = registry.change_versions()
    assert set(start) == {"grants", "sessions"}
    registry.grant("foo", K1)
    registry.set_policy("foo", changes={"allow": ("10.0.0.0/8",)})
    registry.revoke("foo")
    after = registry.change_versions()
    assert after["grants"] == start["grants"] + 3 and after["sessions"] == start["sessions"]
    registry.record_session_start(session_row(key=K1))
    assert registry.change_versions()["sessions"] > after["sessions"]
    with sqlite3.connect(tmp_path / "registry.db") as other:  # diglett-admin, or by hand
        other.execute("INSERT INTO grants (subdomain, key, created, comment, policy) "
                      "VALUES ('bar', ?, 0, '', '{}')", (K2,))
    assert registry.change_versions()["grants"] == after["grants"] + 1


class CountingDb(InlineDb):
    def __init__(self):
        self.calls = []

    def call(self, function, *args):
        self.calls.append(function.__name__)
        return function(*args)


class FakeSession:
    def __init__(self, row):
        self.subdomain, self.key, self.session_id = row.subdomain, row.key, row.id
        self.started, self.recorded, self.label = row.started, True, row.subdomain
        self.door = types.SimpleNamespace(moved=False)  # its port stays on this worker
        self.terminated = []

    def terminate(self, *args, **kwargs):
        self.terminated.append(args)


@pytest.fixture
def poller(registry):
    db = CountingDb()
    server = types.SimpleNamespace(registry=registry, db=db, gateway_id="", sessions={},
                                   moved_away={})
    server.grants = GrantCache(db, registry)
    server.events = types.SimpleNamespace(updated=lambda row: None)
    registry.grant("foo", K1)
    row = session_row(key=K1)
    registry.record_session_start(row)
    server.sessions["foo"] = FakeSession(row)
    return RegistryPoller(server)


def poll(poller):
    versions = poller.change_versions()
    poller.revoke_ungranted(versions.get("grants"))
    poller.check_takeovers(versions.get("sessions"))


def test_no_grant_reload_and_no_takeover_check_without_a_change(poller):
    db = poller.server.db
    poll(poller)
    assert db.calls.count("grant_snapshot") == 1
    assert db.calls.count("active_session_heads") == 1
    for _ in range(5):
        poll(poller)
    assert db.calls.count("grant_snapshot") == 1  # five idle polls: five counter reads only
    assert db.calls.count("active_session_heads") == 1


def test_a_grant_change_reloads_and_a_revoke_still_ends_the_session(poller):
    poll(poller)
    poller.server.registry.revoke("foo")
    poll(poller)
    assert poller.server.db.calls.count("grant_snapshot") == 2
    assert poller.server.sessions["foo"].terminated  # the revoke bites on the next poll


def test_a_newer_session_elsewhere_is_seen_on_the_next_poll(poller):
    poll(poller)
    newer = session_row("%016x" % 5, key=K1, started=5000.0, gateway="gw2")
    poller.server.registry.record_session_start(newer)
    poll(poller)
    assert poller.server.db.calls.count("active_session_heads") == 2
    assert poller.server.sessions["foo"].terminated  # replaced by the newer session


@pytest.mark.parametrize("counted", [False, True])
def test_a_session_the_check_never_saw_is_checked_even_without_a_change(poller, counted):
    if counted:  # the server counts its recorded sessions: idle polls skip even the dict
        poller.server.recorded_sessions = 1
    poll(poller)
    poller.check_takeovers(poller._sessions_seen)
    assert poller.server.db.calls.count("active_session_heads") == 1
    row = session_row("%016x" % 6, subdomain="bar", key=K1, started=3000.0)
    poller.server.sessions["bar"] = FakeSession(row)  # recorded, but the counter was read
    if counted:
        poller.server.recorded_sessions += 1
    poller.check_takeovers(poller._sessions_seen)  # after its commit: same version
    assert poller.server.db.calls.count("active_session_heads") == 2


# ----- writes in one transaction --------------------------------------------------------------
def test_queued_writes_go_in_one_transaction(registry):
    transactions = []

    def counted():
        transactions.append(1)
        return registry.write_batch()

    worker = DatabaseWorker(counted)
    committed = []
    for row in rows(50):
        worker.submit(registry.record_session_start, (row, ()),
                      after=lambda row=row: committed.append(row.id))
    assert worker.drain(10)
    assert len(registry.active_sessions()) == 50
    assert committed == [row.id for row in rows(50)]  # each after its commit, in order
    assert len(transactions) < 50


def test_a_failing_write_rolls_its_batch_back_and_all_are_applied_alone_in_order(registry):
    worker = DatabaseWorker(registry.write_batch)
    failures = [RegistryError("disk full")]

    def write(label):
        if label == "b" and failures:
            raise failures.pop()
        registry.audit("test", label)

    blocker = threading.Event()  # hold the first write, so the others queue behind it
    worker.submit(lambda: blocker.wait(5), ())
    for label in ("a", "b", "c"):
        worker.submit(write, (label,))
    blocker.set()
    assert worker.drain(10)
    written = [e.subdomain for e in reversed(registry.audit_entries()) if e.action == "test"]
    assert written == ["a", "b", "c"]  # "a" once: its batch rolled back with "b"
