"""The hook contract (diglett.hookapi): defaults of Hook, and a foreign class adapted to it."""

import pytest

from diglett import hookapi, hookloader, signals

pytestmark = pytest.mark.timeout(10)


class Bare:
    """A third-party hook written before hookapi existed: the two event methods only."""

    def __init__(self):
        self.seen = []

    def session_started(self, event):
        self.seen.append(("started", event.subdomain))

    def session_ended(self, event):
        self.seen.append(("ended", event.subdomain))


def event(kind):
    return signals.SessionEvent(kind=kind, subdomain="foo", host="foo.example.test",
                                listen_host="127.0.0.1", listen_port=1, agent_key="02" * 33,
                                session_id="s1")


def test_a_bare_class_gets_every_default():
    bare = Bare()
    hook = hookapi.as_hook(bare)
    assert isinstance(hook, hookapi.Hook)
    assert hook.timeout == hookapi.DEFAULT_TIMEOUT and hook.skip_ended_connects is False
    assert hook.metrics() == [] and hook.describe("foo") is None
    hook.start()
    hook.stop()
    hook.session_started(event(signals.EventKind.CONNECT))
    hook.session_ended(event(signals.EventKind.DISCONNECT))
    assert bare.seen == [("started", "foo"), ("ended", "foo")]


def test_an_adapted_class_keeps_what_it_declares():
    class Declared(Bare):
        timeout = 3
        skip_ended_connects = True

        def metrics(self):
            return [("x_total", "counter", "x", 1)]

        def describe(self, name):
            return {"route": name}

    hook = hookapi.as_hook(Declared())
    assert (hook.timeout, hook.skip_ended_connects) == (3, True)
    assert hook.metrics() == [("x_total", "counter", "x", 1)]
    assert hook.describe("foo") == {"route": "foo"}


def test_a_hook_is_not_wrapped_twice():
    hook = hookapi.Hook({}, hookapi.HookContext("example.test"))
    assert hookapi.as_hook(hook) is hook
    with pytest.raises(NotImplementedError):
        hook.session_started(event(signals.EventKind.CONNECT))


def test_every_builtin_hook_derives_from_hook():
    for name, load in hookloader.available().items():
        if name in hookloader.BUILTIN:
            assert issubclass(load(), hookapi.Hook), name


def test_the_event_table_names_each_method():
    assert [signals.method_of(kind) for kind in signals.EventKind] == [
        "session_started", "session_ended", "session_updated"]
    assert signals.method_of("connect") == "session_started"
    for kind in signals.EventKind:
        assert callable(getattr(hookapi.Hook, signals.method_of(kind)))
