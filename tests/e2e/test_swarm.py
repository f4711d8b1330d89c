"""A small swarm end to end (issue 14): 50 of diglett's own Agents in this process (the
bench/swarm.py driver as a library), a real diglett-server with the Traefik REST hook and a
real Traefik. Every route appears, leads to its own agent, and goes again when the agents
stop; the burst of 50 connects reaches Traefik in a handful of PUTs, not 50."""

import re
import sys
import time
from pathlib import Path

import gevent
import pytest

from tests.support import harness
from tests.support.hookfixtures import Traefik

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import swarm  # noqa: E402

pytestmark = pytest.mark.timeout(90)
COUNT = 50
DEADLINE = 40  # seconds for the swarm to be up and routed, and for the routes to go


def wait(predicate, timeout, what):
    """Like harness.wait_until, but sleeping in gevent: the agents run in this process."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        gevent.sleep(0.1)
    return time.monotonic()


def test_fifty_agents_get_their_routes_and_lose_them_again(tmp_path):
    traefik = Traefik(tmp_path / "traefik").start()
    members = swarm.make_members(COUNT, prefix="s")
    gw = harness.Gateway(tmp_path / "gw", sections={
        "hooks": {"enabled": "traefik"},
        "hook:traefik": {"api": traefik.api, "check_interval": "1"}})
    swarm.grant_all(gw.workdir / "registry.db", members)  # one transaction, before the start
    gw.start()
    backend = swarm.Backend()
    agents = swarm.Swarm(gw.agent_address, gw.key, members, backend.address)
    try:
        started = time.monotonic()
        agents.start()
        up = wait(lambda: agents.up() == COUNT, DEADLINE, "every session up")
        live = wait(lambda: len(swarm.routes_live(traefik.api_port, agents)) == COUNT,
                    DEADLINE, "every route live in Traefik")
        print("%d sessions up after %.1f s, routes live after %.1f s"
              % (COUNT, up - started, live - started))
        assert swarm.check_through_traefik(traefik.web_port, agents.agents, count=10,
                                           domain=gw.domain) == 10
        def syncs():  # a sync logs once Traefik confirmed it, maybe after the routes show
            return [int(n) for n in re.findall(r"hook=traefik synced: (\d+) deliveries",
                                               gw.proc.stderr())]

        wait(lambda: sum(syncs()) == COUNT, DEADLINE, "every connect settled")
        assert len(syncs()) < COUNT / 2, syncs()  # coalesced: a few PUTs, not 50
        agents.stop()
        wait(lambda: not swarm.traefik_routes(traefik.api_port), DEADLINE,
             "every route gone from Traefik")
    finally:
        agents.stop()
        backend.close()
