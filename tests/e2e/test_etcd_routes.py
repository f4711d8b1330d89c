"""The etcd route publisher (hook traefik-etcd) against a real etcd: claims, fencing, leases,
and grant policies (the middlewares written with a claim, and removed by an update when they
go; a route whose auth cannot apply is never published).

The hook objects run in the test process, one per simulated gateway, each with its own lease;
the fleet tests (tests/e2e/test_fleet_routes.py) run the same hook inside real servers."""

import json
import shutil
import threading
import time

import pytest
from diglett.hooks import traefik_etcd

from diglett import etcd
from diglett.policy import Policy
from diglett.signals import SessionEvent
from tests.support import harness
from tests.support.etcdfixture import (  # noqa: F401  (fixture)
    Etcd,
    etcd_server,  # noqa: F401  (fixture)
)
from tests.support.policies import APR1, FULL, with_policy

OPTIONS = {"root_key": "traefik", "namespace": "diglett", "lease_ttl": 10, "keepalive": 3,
           "check_interval": 5, "upstream_host": "", "entrypoints": ["web"],
           "cert_resolver": "", "middlewares": [], "mode": "http", "timeout": 5,
           "ca_file": "", "cert_file": "", "key_file": ""}


class Context:
    domain = "fleet.test"
    active_sessions = None

    def __init__(self, gateway_id):
        self.gateway_id = gateway_id


def gateway(etcd_server, gateway_id, **options):
    hook = traefik_etcd.TraefikEtcdHook(
        dict(OPTIONS, endpoints=[etcd_server.url], **options), Context(gateway_id))
    hook._new_lease()  # what the lease loop does first, without its greenlet
    return hook


def event(name, port, started, session=None, kind="connect"):
    return SessionEvent(kind=kind, subdomain=name, host="%s.fleet.test" % name,
                        listen_host="127.0.0.1", listen_port=port, agent_key="02" + "ab" * 32,
                        session_id=session or "s%d" % port, started=started)


def keys(etcd_server, prefix=""):
    client = etcd.Client([etcd_server.url])
    return {k.decode(): v.decode() for k, v, _ in client.range(prefix, prefix=True)}


def route_url(etcd_server, name):
    return keys(etcd_server).get(
        "traefik/http/services/diglett-%s/loadbalancer/servers/0/url" % name)


@pytest.mark.timeout(30)
def test_a_claim_writes_the_owner_and_the_whole_route_and_a_release_removes_them(etcd_server):
    a = gateway(etcd_server, "gw-a")
    assert a.claim(event("foo", 4001, 100.0)) is True
    found = keys(etcd_server)
    router = "traefik/http/routers/diglett-foo/"
    assert found[router + "rule"] == "Host(`foo.fleet.test`)"
    assert found[router + "service"] == "diglett-foo"
    assert found[router + "entrypoints/0"] == "web"
    assert route_url(etcd_server, "foo") == "http://127.0.0.1:4001"
    assert json.loads(found["diglett/owner/foo"])["gateway"] == "gw-a"
    anchor = "traefik/" + traefik_etcd.ANCHOR
    assert found[anchor] == "1"
    a.release(event("foo", 4001, 100.0, kind="disconnect"))
    left = keys(etcd_server, "traefik/http/")
    assert set(left) == {anchor}, left  # the anchor stays: Traefik needs a non-empty tree
    assert "diglett/owner/foo" not in keys(etcd_server)


@pytest.mark.timeout(30)
def test_a_newer_session_takes_the_name_and_the_older_one_cannot_take_it_back(etcd_server):
    a, b = gateway(etcd_server, "gw-a"), gateway(etcd_server, "gw-b")
    old, new = event("foo", 4001, 100.0), event("foo", 4002, 200.0)
    assert a.claim(old)
    assert b.claim(new)  # the same agent reconnected through gateway b
    assert route_url(etcd_server, "foo") == "http://127.0.0.1:4002"
    assert a.claim(old) is False  # a late retry of a's delivery changes nothing
    a.release(event("foo", 4001, 100.0, session=old.session_id, kind="disconnect"))
    assert route_url(etcd_server, "foo") == "http://127.0.0.1:4002"  # fenced
    assert a.counts["claims_lost"] == 1


@pytest.mark.timeout(30)
def test_concurrent_compare_and_swap_on_a_free_name_has_exactly_one_winner(etcd_server):
    client = etcd.Client([etcd_server.url])
    results = []
    barrier = threading.Barrier(16)

    def claim(index):
        barrier.wait()
        won, _ = client.txn([etcd.compare_mod_revision("diglett/owner/race", 0)],
                            [etcd.put("diglett/owner/race", "gw-%d" % index)])
        results.append((won, index))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    winners = [index for won, index in results if won]
    assert len(results) == 16 and len(winners) == 1
    assert keys(etcd_server)["diglett/owner/race"] == "gw-%d" % winners[0]


@pytest.mark.timeout(60)
def test_many_gateways_claiming_one_name_at_once_leave_one_owner_and_its_route(etcd_server):
    hooks = [gateway(etcd_server, "gw-%d" % i) for i in range(8)]
    events = [event("hot", 5000 + i, 1000.0 + i) for i in range(8)]
    barrier = threading.Barrier(8)
    outcome = {}

    def claim(index):
        barrier.wait()
        outcome[index] = hooks[index].claim(events[index])

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcome) == 8
    owner = json.loads(keys(etcd_server)["diglett/owner/hot"])
    assert owner["session"] == events[7].session_id  # the newest session holds the name
    assert outcome[7] is True
    assert route_url(etcd_server, "hot") == "http://127.0.0.1:5007"  # route matches its owner


@pytest.mark.timeout(30)
def test_a_lost_lease_takes_every_route_of_its_gateway_in_one_go(etcd_server):
    a = gateway(etcd_server, "gw-a", lease_ttl=2, keepalive=1)
    b = gateway(etcd_server, "gw-b")
    a.claim(event("one", 4001, 100.0))
    a.claim(event("two", 4002, 100.0))
    b.claim(event("three", 4003, 100.0))
    harness.wait_until(lambda: route_url(etcd_server, "one") is None, 6, interval=0.1,
                       what="gateway a's lease to expire")
    assert route_url(etcd_server, "two") is None
    assert route_url(etcd_server, "three") == "http://127.0.0.1:4003"
    with pytest.raises(etcd.LeaseLost):
        a.client.keepalive(a.lease)


@pytest.mark.timeout(30)
def test_stop_revokes_the_lease_so_routes_go_at_once(etcd_server):
    a = gateway(etcd_server, "gw-a")
    a.claim(event("foo", 4001, 100.0))
    started = time.monotonic()
    a.stop()
    assert route_url(etcd_server, "foo") is None
    assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_etcd_unreachable_is_an_error_that_names_it():
    port = harness.free_port()
    hook = traefik_etcd.TraefikEtcdHook(
        dict(OPTIONS, endpoints=["http://127.0.0.1:%d" % port], timeout=1), Context("gw"))
    with pytest.raises(etcd.EtcdError, match="127.0.0.1:%d" % port):
        hook._new_lease()


@pytest.mark.parametrize("options, message", [
    ({"keepalive": 6}, "at most half of lease_ttl"),
    ({"namespace": "traefik/diglett"}, "must not start with root_key"),
    ({"mode": "udp"}, "http or tcp"),
    ({"endpoints": ["127.0.0.1:2379"]}, "http:// or https://"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    settings = dict(OPTIONS, endpoints=["http://127.0.0.1:2379"])
    settings.update(options)
    with pytest.raises(ValueError, match=message):
        traefik_etcd.TraefikEtcdHook(settings, Context("gw"))


@pytest.mark.timeout(60)
def test_etcd_over_tls_with_a_client_certificate(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("no etcd binary")
    server = Etcd(tmp_path / "etcd", tls=True).start()
    ca, cert, key = server.client_files()
    hook = gateway(server, "gw-a", ca_file=str(ca), cert_file=str(cert), key_file=str(key))
    assert hook.claim(event("foo", 4001, 100.0)) is True
    found = etcd.Client([server.url], ca_file=str(ca), cert_file=str(cert),
                        key_file=str(key)).range("diglett/owner/foo")
    assert json.loads(found[0][1])["gateway"] == "gw-a"
    # Without the client certificate etcd refuses the TLS handshake: an error naming it.
    stranger = traefik_etcd.TraefikEtcdHook(
        dict(OPTIONS, endpoints=[server.url], ca_file=str(ca), timeout=2), Context("gw-b"))
    with pytest.raises(etcd.EtcdError, match="127.0.0.1:%d" % server.client_port):
        stranger._new_lease()


def test_a_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        etcd.Client(["https://127.0.0.1:2379"], cert_file="/etc/hostname")


@pytest.mark.timeout(30)
def test_etcd_claim_writes_the_middlewares_and_an_update_removes_what_went(etcd_server):  # noqa: F811
    hook = gateway(etcd_server, "gw-a")
    first = with_policy(event("foo", 4001, 100.0), FULL)
    assert hook.claim(first)
    stored = keys(etcd_server, "traefik/")
    assert stored["traefik/http/routers/diglett-foo/rule"] == (
        "Host(`foo.fleet.test`) || Host(`www.customer.test`)")
    assert stored["traefik/http/middlewares/diglett-auth-foo/basicauth/users/0"] == (
        "alice:" + APR1)
    assert stored["traefik/http/routers/diglett-foo/middlewares/3"] == "gzip@file"

    hook.session_updated(with_policy(first, Policy(allow=("10.0.0.0/8",))))
    stored = keys(etcd_server, "traefik/")
    assert stored["traefik/http/routers/diglett-foo/rule"] == "Host(`foo.fleet.test`)"
    assert stored["traefik/http/routers/diglett-foo/middlewares/0"] == "diglett-allow-foo"
    assert not [k for k in stored if "diglett-auth-foo" in k or "diglett-fwd-foo" in k
                or k.startswith("traefik/http/routers/diglett-foo/middlewares/1")]

    hook.session_updated(with_policy(first, Policy(mode="tcp")))  # a mode switch moves it
    stored = keys(etcd_server, "traefik/")
    assert not [k for k in stored if k.startswith("traefik/http/") and "diglett-foo" in k]
    assert stored["traefik/tcp/routers/diglett-foo/rule"] == "HostSNI(`foo.fleet.test`)"

    hook.release(first)
    assert not [k for k in keys(etcd_server, "traefik/") if "foo" in k]


@pytest.mark.timeout(30)
def test_etcd_update_of_a_session_that_lost_the_name_changes_nothing(etcd_server):  # noqa: F811
    a, b = gateway(etcd_server, "gw-a"), gateway(etcd_server, "gw-b")
    old = event("foo", 4001, 100.0)
    assert a.claim(old)
    assert b.claim(event("foo", 4002, 200.0))
    before = keys(etcd_server, "traefik/")
    assert a.claim(with_policy(old, FULL)) is False
    assert keys(etcd_server, "traefik/") == before


@pytest.mark.timeout(30)
def test_etcd_refuses_to_publish_a_route_without_its_auth(etcd_server):  # noqa: F811
    hook = gateway(etcd_server, "gw-a", mode="tcp")
    plain = event("foo", 4001, 100.0)
    assert hook.claim(plain)
    with pytest.raises(etcd.EtcdError, match="not published"):
        hook.claim(with_policy(plain, Policy(basic_auth=("alice:" + APR1,))))
    assert not [k for k in keys(etcd_server, "traefik/") if "foo" in k]  # released


# ----- reuse_connections = no: no pooled connection for a restart to cut ---------------------


@pytest.mark.timeout(30)
def test_etcd_without_reuse_writes_the_transport_with_the_route(etcd_server):  # noqa: F811
    hook = gateway(etcd_server, "gw1", reuse_connections=False)
    written = hook.route_keys(event("foo", 4001, started=1.0))
    assert written["traefik/http/serversTransports/diglett-foo/maxidleconnsperhost"] == "-1"
    assert written["traefik/http/services/diglett-foo/loadbalancer/serverstransport"] == \
        "diglett-foo"
