"""How a policy change reaches the hooks without a reconnect, in process: the grant poller
compares each live session's policy before and after a reload and queues an ``update`` for a
changed one only; the update is written to the outbox only while the session is active, and
the dispatcher calls ``session_updated`` (skipped once the session's disconnect is queued).
"""

import time
import types

import pytest

from diglett import crypto, hookapi, hookloader, signals
from diglett.gateway.events import SessionEvents
from diglett.gateway.fleet import GrantCache, RegistryPoller
from diglett.registry import Registry
from tests.support.records import InlineDb
from tests.support.records import session as session_row

pytestmark = pytest.mark.timeout(20)
K1 = crypto.public_hex(crypto.generate_private_key())


class FakeSession:
    def __init__(self, row):
        self.subdomain, self.key, self._row = row.subdomain, row.key, row
        self.label = "subdomain=%s" % row.subdomain
        self.terminated = []

    def row(self):
        return self._row

    def terminate(self, *args, **kwargs):
        self.terminated.append(args)


@pytest.fixture
def world(tmp_path):
    registry = Registry(str(tmp_path / "registry.db"))
    server = types.SimpleNamespace(registry=registry, db=InlineDb())
    server.grants = GrantCache(server.db, registry)
    server.events = types.SimpleNamespace(updates=[])
    server.events.updated = server.events.updates.append
    registry.grant("foo", K1)
    registry.grant("bar", K1)
    server.grants.reload()
    rows = {name: session_row("%016x" % i, subdomain=name, key=K1)
            for i, name in enumerate(("foo", "bar"))}
    server.sessions = {name: FakeSession(row) for name, row in rows.items()}
    yield server
    registry.close()


def test_only_a_changed_policy_queues_an_update(world):
    poller = RegistryPoller(world)
    poller.revoke_ungranted()
    assert world.events.updates == []  # nothing changed: nothing to render
    world.registry.set_policy("foo", changes={"allow": ("10.0.0.0/8",)})
    poller.revoke_ungranted()
    assert [row.subdomain for row in world.events.updates] == ["foo"]
    poller.revoke_ungranted()
    assert len(world.events.updates) == 1  # once per change
    assert not any(s.terminated for s in world.sessions.values())  # nobody reconnects


def test_a_revoke_still_ends_the_session_and_queues_no_update(world):
    world.registry.revoke("bar")
    RegistryPoller(world).revoke_ungranted()
    assert world.sessions["bar"].terminated and world.events.updates == []


def test_an_update_goes_to_the_outbox_only_while_the_session_is_active(tmp_path):
    registry = Registry(str(tmp_path / "registry.db"))
    events = SessionEvents(FakeWriter(), registry, "example.test", "", "server-1")
    events.hook_names = ("traefik",)
    events.policy_of = lambda name, key: {"allow": ["10.0.0.0/8"]}
    row = session_row(key=K1)
    registry.record_session_start(row)
    sent = []
    signals.session_updated.connect(receiver := lambda sender, **extra: sent.append(extra),
                                    weak=False)
    try:
        events.updated(row)
        (delivery,) = registry.pending_deliveries("traefik")
        assert delivery.kind == "update" and delivery.payload["policy"] == {
            "allow": ["10.0.0.0/8"]}
        assert sent[0]["event"].kind == signals.EventKind.UPDATE
        registry.record_session_end(row.id, "agent-left", row.started + 1, [], "")
        events.updated(row)  # ended meanwhile: nothing queued, no signal
        assert len(registry.pending_deliveries("traefik")) == 1 and len(sent) == 1
    finally:
        signals.session_updated.disconnect(receiver)
        registry.close()


class FakeWriter(InlineDb):
    def submit(self, function, args, after=None):
        function(*args)
        if after is not None:
            after()


def test_a_hook_without_session_updated_gets_the_default():
    class Old:  # a third-party hook from before updates existed
        def session_started(self, event):
            pass

        def session_ended(self, event):
            pass

    hook = hookapi.as_hook(Old())
    assert hook.session_updated(object()) is None


def test_the_dispatcher_calls_session_updated_and_skips_it_for_an_ended_session(tmp_path):
    registry = Registry(str(tmp_path / "registry.db"))
    calls = []

    class Recorder(hookapi.Hook):
        skip_ended_connects = True

        def session_started(self, event):
            calls.append("started")

        def session_ended(self, event):
            calls.append("ended")

        def session_updated(self, event):
            calls.append(("updated", event.policy))

    events = SessionEvents(FakeWriter(), registry, "example.test", "", "server-1")
    events.hook_names = ("rec",)
    events.policy_of = lambda name, key: {"mode": "tcp"}
    row = session_row(key=K1)
    registry.record_session_start(row)
    events.updated(row)
    dispatcher = hookloader.Dispatcher("rec", Recorder({}, None), registry, InlineDb(),
                                       {"retry_max": 1, "max_attempts": 0, "max_age": 60})
    dispatcher._start_due(registry.pending_deliveries("rec"), time.time())
    dispatcher._pool.join(timeout=5)
    assert calls == [("updated", {"mode": "tcp"})]
    events.updated(row)
    registry.record_session_end(row.id, "agent-left", row.started + 1,
                                events.deliveries(events.event(row, "disconnect")), "")
    for _ in range(2):  # the update (skipped: its session ended), then the disconnect
        dispatcher._start_due(registry.pending_deliveries("rec"), time.time())
        dispatcher._pool.join(timeout=5)
    assert calls == [("updated", {"mode": "tcp"}), "ended"]
    assert registry.pending_deliveries("rec") == []
    registry.close()
