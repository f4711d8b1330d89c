"""Several gateways on one registry in a real PostgreSQL: grants made once, takeover across
gateways, revocation, a gateway killed for good, and tunnels that keep flowing while the
registry is stuck.

Every process is real and on 127.0.0.1; the PostgreSQL cluster is the session's (pgfixture).
"""

import json
import socket
import time

import pytest

from tests.support import harness

EXIT_REVOKED = 6  # diglett/agent.py
EXIT_REPLACED = 7
STALE_AFTER = 3  # [server] gateway_stale_after in these tests: the smallest allowed


def start_fleet(tmp_path, url, count=2, **options):
    """``count`` gateways gw1, gw2, ... on the database ``url``."""
    return [harness.Gateway(tmp_path / ("gw%d" % number), database=url,
                            gateway_id="gw%d" % number, **options).start()
            for number in range(1, count + 1)]


def active(gateway):
    """{name: session json} of the registry's active sessions, read with diglett-admin."""
    return {row["subdomain"]: row for row in gateway.sessions()}


def audit_ends(gateway, name):
    """Details of the session-end entries of ``name``, oldest first."""
    entries = json.loads(gateway.admin("audit", "--name", name, "--json").stdout)
    return [e["detail"] for e in reversed(entries) if e["action"] == "session-end"]


def transfer_digest_check(port, size=1 << 20):
    """Send ``size`` seeded bytes through the tunnel; the backend answers their SHA-256 and
    ``size`` bytes of its own, which must arrive intact too."""
    with harness.connect(port) as sock:
        harness.send_pattern(sock, size, b"up")
        sock.shutdown(socket.SHUT_WR)
        digest = harness.recv_exact(sock, 32).hex()
        assert digest == harness.sha256_of_pattern(size, b"up")
        assert harness.recv_all(sock) == (harness.sha256_of_pattern(size, b"reply"), size)


@pytest.fixture
def digest_backend():
    backend = harness.Backend(harness.digest_then_reply(1 << 20))
    yield backend
    backend.close()


@pytest.mark.timeout(60)
def test_grants_are_shared_and_a_newer_session_elsewhere_replaces_the_older(
        tmp_path, pg_url, digest_backend):
    gw1, gw2 = start_fleet(tmp_path, pg_url)
    key_file, public = gw1.new_key("foo")
    gw1.grant("foo", public)  # granted once, through gw1's config
    assert [g["subdomain"] for g in json.loads(gw2.admin("grants", "--json").stdout)] == ["foo"]

    first = gw1.agent("foo", digest_backend.address, key_file=key_file)
    transfer_digest_check(first.port)
    harness.wait_until(lambda: active(gw2).get("foo", {}).get("gateway") == "gw1", 5,
                       what="gw1's session in the registry")

    second = gw2.agent("foo", digest_backend.address, key_file=key_file)
    moved = time.monotonic()
    assert first.wait(timeout=10) == EXIT_REPLACED
    assert time.monotonic() - moved < 3.5, "gw1 took too long to give the name up"
    gw1.proc.wait_for(r"subdomain=foo .* replaced by session [0-9a-f]+ on gateway gw2", 5)

    sessions = harness.wait_until(lambda: [s for s in gw1.sessions()
                                           if s["subdomain"] == "foo"] or None, 5)
    assert [(s["gateway"], s["port"]) for s in sessions] == [("gw2", second.port)]
    assert harness.wait_until(lambda: gw1.http_get("/api/tunnels") == [], 5)
    assert [t["subdomain"] for t in gw2.http_get("/api/tunnels")] == ["foo"]
    assert any("reason=replaced" in detail for detail in audit_ends(gw2, "foo"))
    transfer_digest_check(second.port)  # the bytes flow through gw2 now

    table = gw2.admin("sessions").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "KEY", "GATEWAY"]
    assert table[1].split()[2] == "gw2"


@pytest.mark.timeout(60)
def test_revoke_ends_the_session_on_the_gateway_holding_it(tmp_path, pg_url, echo_backend):
    gw1, gw2 = start_fleet(tmp_path, pg_url)
    key_file, public = gw1.new_key("foo")
    gw1.grant("foo", public)
    agent = gw2.agent("foo", echo_backend.address, key_file=key_file)
    gw1.admin("revoke", "foo")  # an operator on gw1's machine; the session is on gw2
    revoked = time.monotonic()
    assert agent.wait(timeout=10) == EXIT_REVOKED
    assert time.monotonic() - revoked < 4
    assert harness.wait_until(lambda: active(gw1) == {}, 5, what="no active session")
    assert any("reason=revoked" in detail for detail in audit_ends(gw1, "foo"))


@pytest.mark.timeout(60)
def test_a_killed_gateways_sessions_are_ended_as_stale_by_another(tmp_path, pg_url,
                                                                   echo_backend):
    gw1, gw2 = start_fleet(tmp_path, pg_url, gateway_stale_after=STALE_AFTER)
    foo = gw1.agent("foo", echo_backend.address)
    bar = gw2.agent("bar", echo_backend.address)
    harness.wait_until(lambda: set(active(gw2)) == {"foo", "bar"}, 5, what="both sessions")

    gw1.proc.kill()  # SIGKILL: no goodbye, its rows stay active
    killed = time.monotonic()
    harness.wait_until(lambda: set(active(gw2)) == {"bar"}, STALE_AFTER + 8, interval=0.2,
                       what="gw2 to end gw1's session")
    elapsed = time.monotonic() - killed
    assert STALE_AFTER - 1.5 <= elapsed <= STALE_AFTER + 6, elapsed
    assert any("reason=stale gateway=gw1" in detail for detail in audit_ends(gw2, "foo"))
    gateways = {g["gateway_id"]: g for g in json.loads(gw2.admin("gateways", "--json").stdout)}
    assert (gateways["gw1"]["up"], gateways["gw1"]["sessions"]) == (False, 0)
    assert (gateways["gw2"]["up"], gateways["gw2"]["sessions"]) == (True, 1)
    assert "gone" in gw2.admin("gateways").stdout

    # gw1 comes back: it ends only what its own previous run left, never gw2's live session
    gw1.restart()
    harness.wait_until(lambda: json.loads(gw2.admin("gateways", "--json").stdout)[0]["up"], 5)
    foo.wait_up(15, count=2)  # foo's agent kept retrying gw1 and is back
    time.sleep(1.5)  # a takeover poll and a sweep of each gateway
    sessions = active(gw1)
    assert (sessions["bar"]["gateway"], sessions["foo"]["gateway"]) == ("gw2", "gw1")
    with harness.connect(bar.port) as sock:
        assert harness.round_trips(sock, 3)
    assert bar.popen.poll() is None


@pytest.mark.timeout(60)
def test_tunnels_keep_flowing_while_the_registry_waits_for_a_lock(tmp_path, postgres, pg_url,
                                                                  echo_backend):
    (gw1,) = start_fleet(tmp_path, pg_url, count=1)
    foo = gw1.agent("foo", echo_backend.address)
    _, public = gw1.new_key("bar")
    bar_key = gw1.workdir / "bar.key"
    gw1.grant("bar", public)
    database = pg_url.rsplit("/", 1)[1]
    locker, watcher = postgres.connect(database), postgres.connect(database)
    locker.autocommit = False
    times, waiting = [], 0
    with harness.connect(foo.port) as sock:
        harness.round_trips(sock, 5)  # warm
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        locked = time.monotonic()
        bar = gw1.agent("bar", echo_backend.address, key_file=bar_key, wait=False)
        while time.monotonic() - locked < 3:
            times += harness.round_trips(sock, 20)
            waiting = max(waiting, _lock_waiters(watcher, database))
        locker.rollback()  # the registry thread's query goes on now
        held = time.monotonic() - locked
        bar.wait_up(15)
        times += harness.round_trips(sock, 20)
    locker.close()
    watcher.close()
    assert waiting >= 1, "the registry never waited for the lock: the test proved nothing"
    times.sort()
    p99 = times[int(len(times) * 0.99)]
    print("%d round trips in %.1f s with the registry stuck, p99 %.1f ms, max %.1f ms"
          % (len(times), held, p99 * 1000, times[-1] * 1000))
    assert len(times) >= 200
    assert p99 < 1.0
    assert set(harness.wait_until(lambda: set(active(gw1)) == {"foo", "bar"} and active(gw1),
                                  10, what="bar recorded after the lock")) == {"foo", "bar"}


def _lock_waiters(connection, database):
    """Backends of ``database`` waiting for a lock now (the registry thread, we hope)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                       "AND wait_event_type = 'Lock'", (database,))
        return cursor.fetchone()[0]

