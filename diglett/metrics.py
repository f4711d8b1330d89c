"""Numbers for /metrics: what the server counts, and the collector that reads it at scrape time.

The data path only adds to plain ints (Tunnel.bytes_up, AgentSession.refused_streams, ...);
nothing here runs per byte. ``Counters`` keeps what must outlive a session (its bytes, streams
and refusals are folded in when it ends, so a counter never goes backwards while the process
lives), and ``Collector`` turns the server's state into Prometheus families when scraped. Every
label value is either a validated subdomain, a hook name from the config, or a fixed string.
It must not do I/O or hold references to ended sessions.
"""

import bisect
import gc
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from diglett import __version__, wire

# upper bounds (seconds) of the session duration buckets: a second to a week
DURATION_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
HOOK_COUNTS = {  # Dispatcher attribute -> (metric, help)
    "delivered": ("diglett_hook_deliveries", "hook calls that worked"),
    "failed": ("diglett_hook_failures", "hook calls that failed (each attempt)"),
    "dead": ("diglett_hook_dead", "deliveries given up after their last attempt"),
}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format 0.0.4


class Histogram:
    """A fixed-bucket histogram of plain numbers; observe() is O(log buckets)."""

    def __init__(self, bounds=DURATION_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self):
        """[(le, count of values <= le)], ending with +Inf, as Prometheus wants them."""
        total, result = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            result.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return result


class Counters:
    """What the server counts beyond its live sessions: refusals and the ended sessions' share."""

    def __init__(self):
        self.refusals = {}  # ERROR code name (UNAUTHORIZED, NAME_IN_USE, ...) -> agents refused
        self.traffic = {}  # subdomain -> [bytes in, bytes out] of its ended sessions
        self.streams_opened = 0  # by ended sessions
        self.stream_refusals = 0  # max_streams reached, by ended sessions
        self.budget_refusals = 0  # memory_budget reached, by ended sessions
        self.idle_resets = 0  # streams reset at stream_idle_timeout, by ended sessions
        self.flood_closes = 0  # sessions the flood guard ended
        self.durations = Histogram()

    def refused(self, code):
        name = wire.code_name(code)
        self.refusals[name] = self.refusals.get(name, 0) + 1

    def session_closed(self, snapshot):
        """Fold an ended session's last SessionSnapshot in; call in the same step that drops
        it from server.sessions."""
        totals = self.traffic.setdefault(snapshot.row.subdomain, [0, 0])
        totals[0] += snapshot.bytes_in
        totals[1] += snapshot.bytes_out
        self.streams_opened += snapshot.streams_opened
        self.stream_refusals += snapshot.refused_streams
        self.budget_refusals += snapshot.budget_refusals
        self.idle_resets += snapshot.idle_resets
        self.flood_closes += snapshot.flooded
        self.durations.observe(max(0.0, time.time() - snapshot.row.started))


def traffic(server, snapshots=None):
    """subdomain -> [bytes in, bytes out], ended sessions plus the live ones."""
    totals = {name: list(pair) for name, pair in server.counters.traffic.items()}
    if snapshots is None:
        snapshots = server.snapshots()
    # Sessions handed over to a newer one still move their last streams' bytes.
    handed_over = [session.snapshot() for session in list(server.draining)]
    for snapshot in list(snapshots.values()) + handed_over:
        pair = totals.setdefault(snapshot.row.subdomain, [0, 0])
        pair[0] += snapshot.bytes_in
        pair[1] += snapshot.bytes_out
    return totals


class Collector:
    """Reads the server (and the hook dispatchers) when Prometheus scrapes."""

    def __init__(self, server, hooks=None):
        self.server = server
        self.hooks = HookFamilies(hooks)

    def describe(self):
        return []  # families are made per scrape; nothing to check at registration

    def collect(self):
        server = self.server
        counters = server.counters
        snapshots = server.snapshots()
        # handed-over sessions finishing their streams count until they end, as live ones
        sessions = list(snapshots.values()) + [s.snapshot() for s in list(server.draining)]
        info = GaugeMetricFamily("diglett_build_info", "diglett version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("diglett_agents_connected", "agents with a live session",
                                value=len(snapshots))
        yield GaugeMetricFamily("diglett_streams_open", "streams open through all tunnels",
                                value=sum(s.streams_open for s in sessions))
        yield CounterMetricFamily(
            "diglett_streams_opened", "streams opened since start",
            value=counters.streams_opened + sum(s.streams_opened for s in sessions))
        yield self._traffic(snapshots)
        yield _by_label("diglett_handshake_failures", "agent handshakes that failed, by reason",
                        "reason", server.handshake_failures)
        yield _by_label("diglett_agent_refusals", "authenticated agents refused, by ERROR code",
                        "code", counters.refusals)
        yield from self.hooks.collect()
        durations = HistogramMetricFamily("diglett_session_duration_seconds",
                                          "length of ended agent sessions")
        durations.add_metric([], counters.durations.cumulative(), counters.durations.sum)
        yield durations
        yield from self._limits(sessions)
        yield from self._holds()
        live, dead = greenlet_counts()
        greenlets = GaugeMetricFamily(
            "diglett_greenlets", "greenlets in the process: live = not finished, dead = "
            "finished, not yet freed by the cyclic garbage collector", labels=["state"])
        greenlets.add_metric(["live"], live)
        greenlets.add_metric(["dead"], dead)
        yield greenlets

    def _traffic(self, snapshots):
        family = CounterMetricFamily(
            "diglett_tunnel_bytes", "bytes through a tunnel: in = public clients to the agent, "
            "out = agent to public clients", labels=["subdomain", "direction"])
        for name, (bytes_in, bytes_out) in sorted(traffic(self.server, snapshots).items()):
            family.add_metric([name, "in"], bytes_in)
            family.add_metric([name, "out"], bytes_out)
        return family

    def _holds(self):
        return _hold_families(self.server)

    def _limits(self, sessions):
        server, counters = self.server, self.server.counters
        admission = server.admission
        yield CounterMetricFamily(
            "diglett_stream_limit_refusals", "client connections reset at max_streams",
            value=counters.stream_refusals + sum(s.refused_streams for s in sessions))
        yield CounterMetricFamily(
            "diglett_memory_budget_refusals", "client connections reset at memory_budget",
            value=counters.budget_refusals + sum(s.budget_refusals for s in sessions))
        yield CounterMetricFamily(
            "diglett_idle_stream_resets", "streams reset after stream_idle_timeout",
            value=counters.idle_resets + sum(s.idle_resets for s in sessions))
        yield CounterMetricFamily(
            "diglett_flood_closes", "agent sessions ended by the flood guard (ENHANCE_YOUR_CALM)",
            value=counters.flood_closes)
        yield GaugeMetricFamily("diglett_buffered_bytes",
                                "tunnel bytes received and not yet delivered",
                                value=sum(s.buffered for s in sessions))
        yield _by_label("diglett_admission_refusals", "connections refused before the handshake",
                        "kind", admission.refused)
        yield CounterMetricFamily("diglett_penalties", "penalties given to a source address",
                                  value=admission.penalties)
        yield GaugeMetricFamily("diglett_handshakes_pending", "handshakes in progress",
                                value=admission.pending)


class HookFamilies:
    """The hook dispatchers' counts; a master (diglett.workers) serves these beside its
    workers' sums, as it alone runs the hooks."""

    def __init__(self, hooks=None):
        self.hooks = hooks  # () -> the running hookloader.Hooks (a reload replaces it), or None
        self._dispatchers = []  # those of the last scrape
        self._retired = {}  # (hook, attribute) -> final counts of dispatchers a reload replaced

    def describe(self):
        return []

    def collect(self):
        hooks = self.hooks() if self.hooks is not None else None
        dispatchers = list(hooks.dispatchers) if hooks is not None else []
        for gone in self._dispatchers:  # stopped by a reload: their counts are final
            if not any(gone is d for d in dispatchers):
                for attribute in HOOK_COUNTS:
                    key = (gone.name, attribute)
                    self._retired[key] = self._retired.get(key, 0) + getattr(gone, attribute)
        self._dispatchers = dispatchers
        for attribute, (name, text) in HOOK_COUNTS.items():
            counts = {hook: count for (hook, kind), count in self._retired.items()
                      if kind == attribute}
            for dispatcher in dispatchers:
                counts[dispatcher.name] = counts.get(dispatcher.name, 0) + getattr(
                    dispatcher, attribute)
            yield _by_label(name, text, "hook", counts)
        for dispatcher in dispatchers:  # a hook's own figures (the etcd lease, its claims)
            for name, kind, text, value in dispatcher.hook.metrics():
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, text, value=value)


def _hold_families(server):
    holds = server.hold_counters
    yield GaugeMetricFamily("diglett_held_visitors", "visitors waiting at a tunnel port whose "
                            "agent left, for its next session (hold_timeout)",
                            value=sum(door.waiting() for door in list(server.doors.values())))
    yield CounterMetricFamily("diglett_holds", "times a tunnel port kept listening after its "
                              "session ended", value=holds.holds)
    yield CounterMetricFamily("diglett_holds_resumed", "holds ended by the name's next session",
                              value=holds.resumed)
    yield _by_label("diglett_hold_visitors", "visitors that arrived while no session served "
                    "their name, by outcome", "outcome",
                    {"held": holds.held, "served": holds.served, "expired": holds.expired,
                     "overflow": holds.overflow})


def greenlet_counts():
    """(live, dead) greenlets among gc's objects (an O(heap) walk, as /debug/stats does). Dead
    ones are mostly garbage in reference cycles that the next full collection frees, so they
    rise and fall; a live count that keeps growing under a steady load is a leak."""
    from greenlet import greenlet

    live = dead = 0
    for obj in gc.get_objects():
        if isinstance(obj, greenlet):
            if obj.dead:
                dead += 1
            else:
                live += 1
    return live, dead


def _by_label(name, documentation, label, counts):
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def make_registry(server, hooks=None):
    """A registry of its own per server (never prometheus_client's global one); ``hooks``
    returns the running hookloader.Hooks."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(server, hooks))
    return registry


def render(registry):
    return generate_latest(registry)
