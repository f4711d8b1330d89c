"""The contract between diglett and a hook: the ``Hook`` base class and ``HookContext``.

A hook module may import this and ``diglett.signals`` (the event it receives), nothing else
of diglett. Every member of ``Hook`` but the two event methods has a working default, so a
hook writes only what it needs; diglett.hookloader calls these members and no others, and
``diglett-admin status`` asks ``describe()`` instead of knowing what any hook publishes.
A third-party class that does not derive from Hook is adapted by the loader to the same
members (docs/hooks.md, "Writing a hook").
"""

DEFAULT_TIMEOUT = 30  # seconds a hook call may take when the hook does not say


class HookContext:
    """What a hook may know of the server: its domain, name and active sessions."""

    def __init__(self, domain, active_sessions=None, config_dir=None, gateway_id=None):
        self.domain = domain  # [server] domain
        self.gateway_id = gateway_id  # [server] gateway_id: this server's name in a fleet
        self.config_dir = config_dir  # relative paths in hook options start here
        self.active_sessions = active_sessions  # () -> [SessionEvent]; set once the server runs


class Hook:
    """Base of every hook; a subclass overrides the event methods and what else it needs."""

    #: ``{option: (type, default, doc)}`` of its ``[hook:NAME]`` section (docs/hooks.md).
    OPTIONS = {}
    #: seconds one call may take; the dispatcher kills it after this plus a grace period.
    timeout = DEFAULT_TIMEOUT
    #: a connect whose disconnect is already queued is skipped (publishing it is pointless).
    skip_ended_connects = False
    #: the hook publishes the whole state at once (every active session, as Traefik's REST
    #: provider takes it): the dispatcher then settles a burst of deliveries with ONE call of
    #: ``sync(events)`` instead of one event method call per delivery.
    mirrors_state = False

    def __init__(self, options, context):
        self.options = options
        self.context = context

    def start(self):
        """Called once before the first delivery (e.g. start a background check)."""

    def stop(self):
        """Called once at shutdown, after the last delivery."""

    def session_started(self, event):
        """A session got its tunnel port; raising is a failure, retried with backoff."""
        raise NotImplementedError

    def session_ended(self, event):
        """A session ended (``event.reason`` says why); raising is a failure, retried."""
        raise NotImplementedError

    def session_updated(self, event):
        """A live session's access policy (``event.policy``) changed; by default nothing
        to do. Raising is a failure, retried."""

    def sync(self, events):
        """Only with ``mirrors_state``, called instead of the event methods: publish the state
        of every active session now (``context.active_sessions()``). ``events`` are the
        deliveries this call settles, oldest first; raising fails all of them, and they are
        retried together with backoff."""
        raise NotImplementedError

    def metrics(self):
        """``[(name, "counter" | "gauge", documentation, value)]`` for /metrics."""
        return []

    def describe(self, name):
        """What this hook has published for the subdomain ``name`` now, as a JSON-able dict
        for ``diglett-admin status``, or None when it publishes nothing it can look up.
        Runs in diglett-admin, without start(): it must look, never change."""
        return None


class Adapted(Hook):
    """A hook class that does not derive from Hook, given Hook's defaults for what it lacks."""

    def __init__(self, inner):  # no super().__init__: the inner object keeps its own state
        self.inner = inner
        for member in ("timeout", "skip_ended_connects", "mirrors_state"):
            setattr(self, member, getattr(inner, member, getattr(Hook, member)))

    def start(self):
        _call_if_present(self.inner, "start")

    def stop(self):
        _call_if_present(self.inner, "stop")

    def session_started(self, event):
        self.inner.session_started(event)

    def session_ended(self, event):
        self.inner.session_ended(event)

    def session_updated(self, event):
        _call_if_present(self.inner, "session_updated", event)

    def sync(self, events):
        self.inner.sync(events)

    def metrics(self):
        return _call_if_present(self.inner, "metrics") or []

    def describe(self, name):
        return _call_if_present(self.inner, "describe", name)


def as_hook(obj):
    return obj if isinstance(obj, Hook) else Adapted(obj)


def _call_if_present(obj, member, *args):
    method = getattr(obj, member, None)
    return method(*args) if method is not None else None
