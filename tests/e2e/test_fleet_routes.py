"""A fleet on one machine: etcd, PostgreSQL, two Traefiks (etcd provider) and three diglett
servers sharing one registry and one server key, with agents that know every gateway.

What users of a fleet rely on: every name is reachable through every Traefik; a gateway killed
or paused loses its names to the gateways its agents move to, and never takes them back; etcd
or Traefik restarting brings the routes back without any agent reconnecting.
"""

import json
import shutil
import signal
import time

import pytest

from diglett import etcd
from tests.support import harness
from tests.support.etcdfixture import etcd_server  # noqa: F401  (fixture)
from tests.support.hookfixtures import HttpBackend, Traefik, body_for

LEASE_TTL = 3  # seconds; short so the tests see expiry quickly
DOMAIN = "fleet.test"


class Fleet:
    def __init__(self, workdir, etcd_url, database, size=3):
        self.etcd_url = etcd_url
        self.traefiks = [Traefik(workdir / ("traefik-%d" % i), etcd=etcd_url).start()
                         for i in range(2)]
        self.gateways = []
        for index in range(size):
            gateway = harness.Gateway(
                workdir / ("gw%d" % index), domain=DOMAIN, database=database,
                gateway_id="gw%d" % index,
                sections={"hooks": {"enabled": "traefik-etcd", "retry_max": "1"},
                          "hook:traefik-etcd": {"endpoints": etcd_url, "lease_ttl": LEASE_TTL,
                                                "keepalive": "1", "check_interval": "1",
                                                "entrypoints": "web"}})
            if self.gateways:  # one server key for the whole fleet: agents pin one key
                shutil.copy(self.gateways[0].workdir / "server.key", gateway.workdir)
            self.gateways.append(gateway.start())
        self.backends = {}

    def agent(self, name, first, only=False):
        """An agent for ``name`` that knows every gateway and tries gateway ``first`` first
        (with ``only``, it knows that one gateway alone)."""
        backend = self.backends[name] = HttpBackend(name)
        key_file, public = self.gateways[0].new_key(name)
        self.gateways[0].grant(name, public)
        order = self.gateways[first:] + self.gateways[:first]
        if only:
            order = order[:1]
        argv = harness.command("diglett") + [
            "-g", ",".join(g.gateway for g in order), "-n", name, "--key-file", str(key_file),
            "--server-key", self.gateways[0].key, "%s:%d" % backend.address]
        agent = harness.Agent(argv, self.gateways[0].workdir, "agent-%s" % name)
        agent.wait_up()
        return agent

    def holder(self, name):
        """(gateway index, tunnel port) of the newest active session of ``name`` in the
        registry (a killed gateway's session stays listed until the stale sweep)."""
        rows = [row for row in self.live_gateway().sessions() if row["subdomain"] == name]
        if not rows:
            return None
        row = max(rows, key=lambda row: row["started"])
        return int(row["gateway"][2:]), row["port"]

    def live_gateway(self):
        return next(g for g in self.gateways if g.proc.popen.poll() is None)

    def served(self, name, traefik):
        try:
            return traefik.get("%s.%s" % (name, DOMAIN)) == (200, body_for(name))
        except OSError:
            return False

    def served_everywhere(self, name):
        return all(self.served(name, traefik) for traefik in self.traefiks)

    def gone_everywhere(self, name):
        return all(traefik.status("%s.%s" % (name, DOMAIN)) == 404 for traefik in self.traefiks)

    def route_ports(self):
        """name -> tunnel port of every route in etcd."""
        keys = etcd.Client([self.etcd_url]).range("traefik/http/services/", prefix=True)
        return {key.decode().split("/")[3][len("diglett-"):]: int(value.rsplit(b":", 1)[1])
                for key, value, _ in keys if key.endswith(b"/url")}

    def owner(self, name):
        found = etcd.Client([self.etcd_url]).range("diglett/owner/" + name)
        return json.loads(found[0][1]) if found else None

    def close(self):
        for backend in self.backends.values():
            backend.close()


@pytest.fixture
def fleet(tmp_path, etcd_server, pg_url):  # noqa: F811
    fleet = Fleet(tmp_path, etcd_server.url, pg_url)
    yield fleet
    fleet.close()


def wait_served(fleet, names, timeout, what):
    harness.wait_until(lambda: all(fleet.served_everywhere(n) for n in names), timeout,
                       interval=0.1, what=what)


@pytest.mark.timeout(120)
def test_agents_spread_over_gateways_survive_a_gateway_killed(fleet):
    names = ["alpha", "bravo", "charlie"]
    agents = [fleet.agent(name, first=i) for i, name in enumerate(names)]
    stranded = fleet.agent("stranded", first=0, only=True)  # knows the victim alone
    wait_served(fleet, names + ["stranded"], 15, "every name through both Traefiks")
    assert sorted(fleet.holder(n)[0] for n in names) == [0, 1, 2]  # one agent per gateway
    # diglett-admin status asks the etcd hook what it published (any gateway can answer).
    published = json.loads(fleet.gateways[2].admin("status", "alpha", "--json").stdout)[
        "published"]["traefik-etcd"]
    assert published["route"] == "Host(`alpha.%s`)" % DOMAIN
    assert published["owner"] == fleet.owner("alpha")

    victim, dead_port = fleet.holder("alpha")
    assert victim == 0 and fleet.holder("stranded")[0] == 0
    killed = time.monotonic()
    fleet.gateways[victim].proc.kill()
    # Its agent moves to the next gateway, which takes the name over at once.
    harness.wait_until(lambda: (fleet.holder("alpha") or (victim,))[0] != victim, 15,
                       interval=0.1, what="alpha to reconnect to another gateway")
    wait_served(fleet, ["alpha"], LEASE_TTL + 10, "alpha through both Traefiks again")
    moved = time.monotonic() - killed
    assert fleet.owner("alpha")["gateway"] != "gw%d" % victim
    # A name whose agent cannot move disappears from both Traefiks with the dead lease.
    harness.wait_until(lambda: fleet.gone_everywhere("stranded"), LEASE_TTL + 2 - (
        time.monotonic() - killed), interval=0.1, what="stranded to be gone from both Traefiks")
    gone = time.monotonic() - killed
    # After the dead gateway's lease is gone, no route points at it.
    time.sleep(LEASE_TTL + 2 - min(moved, LEASE_TTL + 2))
    ports = fleet.route_ports()
    assert dead_port not in ports.values()
    assert set(ports) == set(names)  # stranded's route went with the dead lease
    for name in names:
        assert ports[name] == fleet.holder(name)[1]
    wait_served(fleet, names, 5, "every name through both Traefiks")
    print("alpha served again %.2f s after its gateway was killed; stranded gone after %.2f s"
          % (moved, gone))
    assert agents[1].popen.poll() is None and agents[2].popen.poll() is None
    assert stranded.popen.poll() is None  # still retrying its one gateway


@pytest.mark.timeout(120)
def test_a_paused_gateway_loses_its_lease_and_never_takes_its_name_back(fleet):
    fleet.agent("delta", first=0)
    fleet.agent("echo", first=1)
    wait_served(fleet, ["delta", "echo"], 15, "both names through both Traefiks")
    paused = fleet.gateways[0]
    paused.proc.signal(signal.SIGSTOP)
    try:
        # The agent finds the paused gateway dead, moves on, and the next gateway claims.
        harness.wait_until(lambda: (fleet.owner("delta") or {}).get("gateway") not in
                           (None, "gw0"), 30, interval=0.2, what="delta to move off gw0")
        time.sleep(LEASE_TTL + 1)  # and gw0's lease has certainly expired
    finally:
        paused.proc.signal(signal.SIGCONT)
    new_owner = fleet.owner("delta")
    paused.proc.wait_for("lost its lease", timeout=15)
    time.sleep(3)  # gw0 has re-claimed what it still holds
    assert fleet.owner("delta") == new_owner
    assert fleet.route_ports()["delta"] == fleet.holder("delta")[1]
    wait_served(fleet, ["delta", "echo"], 10, "both names after gw0 came back")


@pytest.mark.timeout(120)
def test_etcd_and_traefik_restarts_bring_routes_back_without_reconnects(fleet, etcd_server):  # noqa: F811
    agents = [fleet.agent(name, first=i) for i, name in enumerate(["foxtrot", "golf"])]
    wait_served(fleet, ["foxtrot", "golf"], 15, "both names through both Traefiks")
    sessions = {n: fleet.holder(n) for n in ["foxtrot", "golf"]}

    etcd_server.restart()  # same data folder: leases and keys survive
    wait_served(fleet, ["foxtrot", "golf"], 20, "both names after etcd restarted")
    fleet.traefiks[0].restart()  # it forgets everything and reads etcd again
    wait_served(fleet, ["foxtrot", "golf"], 20, "both names after Traefik restarted")

    assert {n: fleet.holder(n) for n in ["foxtrot", "golf"]} == sessions
    for agent in agents:
        assert agent.stderr().count("tunnel up") == 1  # no agent reconnected


@pytest.mark.timeout(60)
def test_a_clean_stop_revokes_the_lease_so_its_routes_go_at_once(fleet):
    fleet.agent("hotel", first=2)
    wait_served(fleet, ["hotel"], 15, "hotel through both Traefiks")
    gateway = fleet.gateways[2]
    gateway.proc.signal(signal.SIGTERM)
    gateway.proc.wait(20)
    assert "revoked lease" in gateway.proc.stderr()
