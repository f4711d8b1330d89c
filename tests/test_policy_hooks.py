"""Both Traefik hooks with grant policies, without a server: what the REST hook PUTs for a
policy (per-router middlewares, alias hosts, a per-grant mode), what the etcd hook writes and,
on an update, deletes (against a real etcd), and that a policy a route cannot carry leaves it
unpublished rather than unguarded.
"""

import dataclasses

import pytest

from diglett import etcd
from diglett.policy import Policy
from tests.etcdfixture import etcd_server  # noqa: F401  (fixture)
from tests.test_etcd_routes import event as etcd_event
from tests.test_etcd_routes import gateway, keys
from tests.test_hooks_unit import event, traefik_hook

pytestmark = pytest.mark.timeout(30)
APR1 = "$apr1$diglett1$" + "b" * 22
FULL = Policy(aliases=("www.customer.test",), basic_auth=("alice:" + APR1,),
              allow=("127.0.0.1/32",), forward_auth="http://127.0.0.1:9091/check",
              middlewares=("gzip@file",))


def with_policy(ev, policy):
    return dataclasses.replace(ev, policy=policy.to_json())


def test_rest_renders_each_grant_its_own_middlewares(tmp_path):
    hook = traefik_hook(tmp_path, middlewares="headers@file", cert_resolver="le")
    rendered = hook.render([with_policy(event("foo", port=4001), FULL), event("bar", port=4002)])
    http = rendered["http"]
    assert http["routers"]["diglett-foo"] == {
        "service": "diglett-foo",
        "rule": "Host(`foo.example.test`) || Host(`www.customer.test`)",
        "middlewares": ["headers@file", "diglett-allow-foo", "diglett-fwd-foo",
                        "diglett-auth-foo", "gzip@file"],
        "tls": {"certResolver": "le"},
    }
    assert http["middlewares"] == {
        "diglett-allow-foo": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
        "diglett-fwd-foo": {"forwardAuth": {"address": "http://127.0.0.1:9091/check"}},
        "diglett-auth-foo": {"basicAuth": {"users": ["alice:" + APR1]}},
    }
    assert http["routers"]["diglett-bar"]["middlewares"] == ["headers@file"]  # only global


def test_rest_puts_a_grant_of_the_other_mode_in_its_own_section(tmp_path):
    hook = traefik_hook(tmp_path)
    tcp = with_policy(event("db", port=4003), Policy(mode="tcp", allow=("10.0.0.0/8",),
                                                     aliases=("db.customer.test",)))
    rendered = hook.render([event("foo"), tcp])
    assert list(rendered["http"]["routers"]) == ["diglett-foo"]
    assert rendered["tcp"]["routers"]["diglett-db"] == {
        "service": "diglett-db", "rule": "HostSNI(`db.example.test`) || "
        "HostSNI(`db.customer.test`)", "tls": {"passthrough": True},
        "middlewares": ["diglett-allow-db"]}
    assert rendered["tcp"]["middlewares"] == {
        "diglett-allow-db": {"ipAllowList": {"sourceRange": ["10.0.0.0/8"]}}}
    assert rendered["tcp"]["services"]["diglett-db"]["loadBalancer"]["servers"] == [
        {"address": "127.0.0.1:4003"}]


def test_rest_leaves_out_a_route_whose_auth_cannot_apply(tmp_path, caplog):
    hook = traefik_hook(tmp_path, mode="tcp")  # the grant names no mode: the hook's is tcp
    guarded = with_policy(event("foo"), Policy(basic_auth=("alice:" + APR1,)))
    assert hook.render([guarded, event("bar")])["tcp"]["routers"].keys() == {"diglett-bar"}
    assert "foo not published" in caplog.text


def test_rest_never_routes_an_alias_inside_the_tunnel_domain(tmp_path):
    hook = traefik_hook(tmp_path)
    sneaky = dataclasses.replace(event("foo"), policy={"aliases": ["bar.example.test",
                                                                   "www.customer.test"]})
    rule = hook.render([sneaky])["http"]["routers"]["diglett-foo"]["rule"]
    assert rule == "Host(`foo.example.test`) || Host(`www.customer.test`)"


def test_rest_update_pushes_the_whole_configuration_again(tmp_path):
    hook = traefik_hook(tmp_path)
    calls = []
    hook.sync = lambda: calls.append("sync")
    hook.session_updated(with_policy(event("foo"), FULL))
    assert calls == ["sync"]


def test_etcd_claim_writes_the_middlewares_and_an_update_removes_what_went(etcd_server):  # noqa: F811
    hook = gateway(etcd_server, "gw-a")
    first = with_policy(etcd_event("foo", 4001, 100.0), FULL)
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


def test_etcd_update_of_a_session_that_lost_the_name_changes_nothing(etcd_server):  # noqa: F811
    a, b = gateway(etcd_server, "gw-a"), gateway(etcd_server, "gw-b")
    old = etcd_event("foo", 4001, 100.0)
    assert a.claim(old)
    assert b.claim(etcd_event("foo", 4002, 200.0))
    before = keys(etcd_server, "traefik/")
    assert a.claim(with_policy(old, FULL)) is False
    assert keys(etcd_server, "traefik/") == before


def test_etcd_refuses_to_publish_a_route_without_its_auth(etcd_server):  # noqa: F811
    hook = gateway(etcd_server, "gw-a", mode="tcp")
    plain = etcd_event("foo", 4001, 100.0)
    assert hook.claim(plain)
    with pytest.raises(etcd.EtcdError, match="not published"):
        hook.claim(with_policy(plain, Policy(basic_auth=("alice:" + APR1,))))
    assert not [k for k in keys(etcd_server, "traefik/") if "foo" in k]  # released


# ----- reuse_connections = no: no pooled connection for a restart to cut ---------------------
def test_rest_without_reuse_gives_each_http_route_a_transport_keeping_no_idle_connection(
        tmp_path):
    hook = traefik_hook(tmp_path, reuse_connections="no")
    http = hook.render([event("foo", port=4001)])["http"]
    assert http["services"]["diglett-foo"]["loadBalancer"]["serversTransport"] == "diglett-foo"
    assert http["serversTransports"] == {"diglett-foo": {"maxIdleConnsPerHost": -1}}
    default = traefik_hook(tmp_path / "b").render([event("foo", port=4001)])["http"]
    assert "serversTransports" not in default


def test_etcd_without_reuse_writes_the_transport_with_the_route(etcd_server):  # noqa: F811
    hook = gateway(etcd_server, "gw1", reuse_connections=False)
    written = hook.route_keys(etcd_event("foo", 4001, started=1.0))
    assert written["traefik/http/serversTransports/diglett-foo/maxidleconnsperhost"] == "-1"
    assert written["traefik/http/services/diglett-foo/loadbalancer/serverstransport"] == \
        "diglett-foo"
