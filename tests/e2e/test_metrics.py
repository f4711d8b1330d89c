"""/metrics, /api/tunnels and who may read them: a real server, agents and counted traffic.

Byte counts are checked exactly: every byte a test client writes is "in", every byte the
backend writes back is "out", and nothing else flows through the tunnels of these tests.
"""

import json
import socket
import types
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diglett import hookapi, metrics, wire
from diglett.gateway.doors import HoldCounters
from tests.support import harness
from tests.support.harness import Backend, Gateway, connect, wait_until

pytestmark = pytest.mark.timeout(60)

UP_1, UP_2 = 100_000, 7  # bytes two clients send through "foo"
REPLY = 250_000  # bytes the "foo" backend answers after the 32-byte digest


# ----- helpers --------------------------------------------------------------------------------
def fetch(address, path, token=None, host="127.0.0.1"):
    """(status, body bytes) of GET http://host:port/path."""
    request = urllib.request.Request("http://%s:%d%s" % (host, address[1], path))
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(gateway, token=None):
    """{(sample name, frozenset of label items): value} of one /metrics scrape."""
    status, body = fetch(gateway.http_address, "/metrics", token)
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def tunnel_bytes(samples):
    """{(subdomain, direction): bytes}: every sample of diglett_tunnel_bytes_total."""
    return {(dict(labels)["subdomain"], dict(labels)["direction"]): count
            for (name, labels), count in samples.items() if name == "diglett_tunnel_bytes_total"}


def wait_metric(gateway, predicate, what, timeout=10):
    return wait_until(lambda: (lambda s: predicate(s) and s)(scrape(gateway)), timeout,
                      interval=0.05, what=what)


def send_and_digest(port, size, seed):
    """One stream through the "foo" tunnel: ``size`` bytes up, digest and REPLY bytes back."""
    with connect(port) as sock:
        harness.send_pattern(sock, size, seed)
        sock.shutdown(socket.SHUT_WR)
        reply = harness.recv_exact(sock, 32 + REPLY)
        assert sock.recv(1) == b""
    assert reply[:32].hex() == harness.sha256_of_pattern(size, seed)


# ----- traffic --------------------------------------------------------------------------------
def test_counters_match_the_traffic_sent(gateway):
    digest_backend = Backend(harness.digest_then_reply(REPLY))
    echo_backend = Backend(harness.echo)
    try:
        foo = gateway.agent("foo", digest_backend.address)
        bar_key, bar_public = gateway.new_key("bar")
        gateway.grant("bar", bar_public)
        bar = gateway.agent("bar", echo_backend.address, key_file=bar_key)

        # counted while the stream is open, not when it closes
        live = connect(bar.port)
        live.sendall(b"a" * 4096)
        assert harness.recv_exact(live, 4096) == b"a" * 4096
        samples = wait_metric(gateway, lambda s: tunnel_bytes(s).get(("bar", "out")) == 4096,
                              "bar's live stream in the counters")
        assert tunnel_bytes(samples) == {("bar", "in"): 4096, ("bar", "out"): 4096,
                                         ("foo", "in"): 0, ("foo", "out"): 0}
        assert value(samples, "diglett_streams_open") == 1
        assert value(samples, "diglett_agents_connected") == 2
        assert value(samples, "diglett_greenlets", state="live") >= 2  # accept, grant loops

        send_and_digest(foo.port, UP_1, b"one")
        send_and_digest(foo.port, UP_2, b"two")
        samples = wait_metric(gateway, lambda s: value(s, "diglett_streams_open") == 1,
                              "foo's streams to close")
        assert tunnel_bytes(samples) == {
            ("foo", "in"): UP_1 + UP_2, ("foo", "out"): 2 * (32 + REPLY),
            ("bar", "in"): 4096, ("bar", "out"): 4096}
        assert value(samples, "diglett_streams_opened_total") == 3
        assert value(samples, "diglett_session_duration_seconds_count") == 0

        # /api/tunnels: the session rows with this session's traffic
        status, body = fetch(gateway.http_address, "/api/tunnels")
        assert status == 200
        tunnels = {t["subdomain"]: t for t in json.loads(body)}
        assert set(tunnels) == {"foo", "bar"}
        rows = {row["subdomain"]: row for row in gateway.sessions()}
        for name, agent in (("foo", foo), ("bar", bar)):
            entry = dict(tunnels[name])
            extra = {k: entry.pop(k) for k in ("public_host", "bytes_in", "bytes_out",
                                              "streams_open", "streams_opened")}
            assert entry == rows[name]  # the same object as `diglett-admin sessions --json`
            assert extra["public_host"] == "%s.example.test" % name
            assert entry["port"] == agent.port and entry["host"] == "127.0.0.1"
        assert (tunnels["foo"]["bytes_in"], tunnels["foo"]["bytes_out"]) == (
            UP_1 + UP_2, 2 * (32 + REPLY))
        assert (tunnels["foo"]["streams_open"], tunnels["foo"]["streams_opened"]) == (0, 2)
        assert (tunnels["bar"]["streams_open"], tunnels["bar"]["streams_opened"]) == (1, 1)

        # a reconnect keeps the subdomain's counters: they never go backwards
        live.close()
        bar.kill()
        samples = wait_metric(gateway, lambda s: value(s, "diglett_agents_connected") == 1,
                              "bar's session to end")
        assert value(samples, "diglett_session_duration_seconds_count") == 1
        assert value(samples, "diglett_session_duration_seconds_bucket", le="+Inf") == 1
        assert tunnel_bytes(samples)[("bar", "in")] == 4096
        bar = gateway.agent("bar", echo_backend.address, key_file=bar_key)
        with connect(bar.port) as sock:
            sock.sendall(b"0123456789")
            assert harness.recv_exact(sock, 10) == b"0123456789"
            samples = wait_metric(gateway,
                                  lambda s: tunnel_bytes(s).get(("bar", "out")) == 4106,
                                  "bar's new session added to the old counts")
        assert tunnel_bytes(samples)[("bar", "in")] == 4106
        assert value(samples, "diglett_streams_opened_total") == 4
    finally:
        digest_backend.close()
        echo_backend.close()


def test_handshake_failures_refusals_and_penalties_are_counted(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw", penalty_max=30).start()
    gw.agent("foo", echo_backend.address)
    other_key, other_public = gw.new_key("other")
    gw.grant("foo", other_public)

    # NAME_IN_USE: a granted key while the name is connected with another one (no penalty)
    in_use = gw.agent("foo", echo_backend.address, key_file=other_key, wait=False,
                      label="in-use")
    wait_metric(gw, lambda s: value(s, "diglett_agent_refusals_total", code="NAME_IN_USE") >= 1,
                "a NAME_IN_USE refusal")
    in_use.kill()

    # junk instead of a preamble: a handshake failure and a 1 s penalty for 127.0.0.1 ...
    with socket.create_connection(gw.agent_address, timeout=5) as sock:
        sock.sendall(b"GET / HT")  # exactly a preamble's size: the server reads it all
        assert sock.recv(64) == b""  # closed after the penalty was recorded
    # ... during which the next connection is refused before any crypto
    with socket.create_connection(gw.agent_address, timeout=5) as sock:
        _, code = wire.parse_reject(harness.recv_exact(sock, wire.PREAMBLE_SIZE))
    assert code == wire.RejectCode.BUSY
    samples = wait_metric(
        gw, lambda s: value(s, "diglett_admission_refusals_total", kind="penalised") >= 1,
        "an admission refusal")
    assert value(samples, "diglett_penalties_total") >= 1
    assert value(samples, "diglett_handshake_failures_total",
                 reason="bad preamble or CONFIG") == 1

    # UNAUTHORIZED: a key without a grant for the name (retried past the penalty)
    stranger_key, _ = gw.new_key("stranger")
    gw.agent("baz", echo_backend.address, key_file=stranger_key, wait=False, label="stranger")
    samples = wait_metric(
        gw, lambda s: value(s, "diglett_agent_refusals_total", code="UNAUTHORIZED") == 1,
        "an UNAUTHORIZED refusal", timeout=20)
    assert value(samples, "diglett_agents_connected") == 1
    assert value(samples, "diglett_handshake_failures_total",
                 reason="bad preamble or CONFIG") == 1


# ----- who may read what ----------------------------------------------------------------------
PRIVATE = ("/metrics", "/api/tunnels", "/", "/debug/stats")


def test_loopback_serves_everything_without_a_token(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw", http="127.0.0.2:0", token="s3cret").start()  # 127/8 is loopback
    gw.agent("foo", echo_backend.address)
    for path in PRIVATE:
        status, body = fetch(gw.http_address, path, host="127.0.0.2")
        assert status == 200, (path, body)
    assert b"foo.example.test" in fetch(gw.http_address, "/", host="127.0.0.2")[1]


def test_off_loopback_the_rest_needs_the_token(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw", http="0.0.0.0:0", token="s3cret").start()  # every interface
    gw.agent("foo", echo_backend.address)
    for path in ("/info", "/healthz"):
        assert fetch(gw.http_address, path)[0] == 200
    assert b"foo" not in fetch(gw.http_address, "/info")[1]  # /info never lists tunnels
    for path in PRIVATE:
        assert fetch(gw.http_address, path)[0] == 401, path
        assert fetch(gw.http_address, path, token="wrong")[0] == 401, path
        status, body = fetch(gw.http_address, path, token="s3cret")
        assert status == 200, (path, body)
    assert value(scrape(gw, "s3cret"), "diglett_agents_connected") == 1


def test_off_loopback_without_a_token_only_info_and_healthz(tmp_path, echo_backend):
    gw = Gateway(tmp_path / "gw", http="0.0.0.0:0").start()
    gw.agent("foo", echo_backend.address)
    assert fetch(gw.http_address, "/info")[0] == 200
    assert fetch(gw.http_address, "/healthz")[0] == 200
    for path in PRIVATE:
        status, body = fetch(gw.http_address, path, token="")
        assert status == 404 and b"foo" not in body, path
    assert "only /info and /healthz are served" in gw.proc.stderr()


# ----- the collector without processes -------------------------------------------------------
def test_histogram_buckets_are_cumulative():
    histogram = metrics.Histogram((1, 10))
    for seconds in (0.5, 1, 3, 30):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("1.0", 2), ("10.0", 3), ("+Inf", 4)]
    assert histogram.sum == 34.5


def test_hook_counters_survive_a_reload():
    """A reload replaces the dispatchers; their final counts stay in the totals."""
    server = types.SimpleNamespace(
        sessions={}, snapshots=dict, draining=(), doors={}, hold_counters=HoldCounters(),
        counters=metrics.Counters(), handshake_failures={},
        admission=types.SimpleNamespace(refused={}, penalties=0, pending=0))
    quiet = hookapi.Hook({}, None)  # a hook with no figures of its own
    old = types.SimpleNamespace(name="webhook", delivered=3, failed=2, dead=1, hook=quiet)
    hooks = types.SimpleNamespace(dispatchers=[old])
    registry = metrics.make_registry(server, lambda: hooks)

    def counts():
        samples = {}
        for family in text_string_to_metric_families(metrics.render(registry).decode()):
            for sample in family.samples:
                if sample.name.startswith("diglett_hook_"):
                    samples[sample.name, sample.labels["hook"]] = sample.value
        return samples

    assert counts()["diglett_hook_deliveries_total", "webhook"] == 3
    hooks = types.SimpleNamespace(dispatchers=[
        types.SimpleNamespace(name="webhook", delivered=1, failed=0, dead=0, hook=quiet),
        types.SimpleNamespace(name="script", delivered=5, failed=0, dead=0, hook=quiet)])
    assert counts() == {
        ("diglett_hook_deliveries_total", "webhook"): 4,
        ("diglett_hook_failures_total", "webhook"): 2,
        ("diglett_hook_dead_total", "webhook"): 1,
        ("diglett_hook_deliveries_total", "script"): 5,
        ("diglett_hook_failures_total", "script"): 0,
        ("diglett_hook_dead_total", "script"): 0}
