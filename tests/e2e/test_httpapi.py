"""The write API beside the read one, against a real server: grants and invites by POST and
DELETE, the same refusals as diglett-admin (nothing written), the token rule of the read API,
and the same-origin and loopback-host rules that keep a web page from writing (CSRF, DNS
rebinding).
"""

import json
import urllib.error
import urllib.request

import pytest

from diglett import crypto, invitecode
from tests.support.harness import Gateway

pytestmark = pytest.mark.timeout(60)
APR1 = "$apr1$diglett1$" + "b" * 22


def call(gw, method, path, body=None, token=None, headers=None, host=None):
    """(status, JSON body) of one request to the server's HTTP listener."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (gw.http_address[1], path),
                                     data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    if host is not None:
        request.add_header("Host", host)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    gateway = Gateway(tmp_path_factory.mktemp("gw")).start()
    yield gateway
    gateway.proc.close()


@pytest.fixture
def key():
    return crypto.public_hex(crypto.generate_private_key())


def stored(gw):
    return json.loads(gw.admin("grants", "--json").stdout)


def test_post_a_grant_with_a_policy_then_delete_it(gw, key):
    status, grant = call(gw, "POST", "/api/grants", {
        "subdomain": "Api1", "key": key, "comment": "from the API",
        "policy": {"aliases": ["www.customer.test"], "basic_auth": ["alice:" + APR1]}})
    assert status == 200, grant
    assert (grant["subdomain"], grant["key"]) == ("api1", key)
    assert grant["policy"]["aliases"] == ["www.customer.test"]
    status, listed = call(gw, "GET", "/api/grants")
    assert status == 200 and [g["subdomain"] for g in listed] == ["api1"]
    status, grant = call(gw, "POST", "/api/grants", {"subdomain": "api1", "key": key,
                                                     "clear": ["basic_auth"]})
    assert grant["policy"]["basic_auth"] == [] and grant["policy"]["aliases"] == [
        "www.customer.test"]  # a field not named keeps its value
    audit = json.loads(gw.admin("audit", "--name", "api1", "--json").stdout)
    assert audit[0]["actor"].startswith("http-api 127.0.0.1")
    assert call(gw, "DELETE", "/api/grants/api1?key=" + key) == (
        200, {"revoked": 1, "subdomain": "api1"})
    assert call(gw, "DELETE", "/api/grants/api1")[0] == 404
    assert stored(gw) == []


@pytest.mark.parametrize("body, reason", [
    ({"subdomain": "api2", "key": "KEY", "policy": {"allow": ["10.0.0.1/24"]}}, "host bits"),
    ({"subdomain": "api2", "key": "KEY", "policy": {"basic_auth": ["alice:pw"]}},
     "plain passwords"),
    ({"subdomain": "api2", "key": "KEY", "policy": {"aliases": ["a.test`)"]}}, "host name"),
    ({"subdomain": "api2", "key": "KEY", "policy": {"aliases": ["x.example.test"]}},
     "inside the tunnel domain"),
    ({"subdomain": "api2", "key": "KEY", "policy": {"forward_auth": "javascript:x"}},
     "http:// or https://"),
    ({"subdomain": "api2", "key": "KEY", "policy": {"colour": "red"}}, "unknown policy"),
    ({"subdomain": "api 2", "key": "KEY"}, "invalid subdomain"),
    ({"subdomain": "api2", "key": "zz"}, "key"),
])
def test_bad_input_is_a_400_with_the_reason_and_writes_nothing(gw, key, body, reason):
    body = {name: key if value == "KEY" else value for name, value in body.items()}
    status, answer = call(gw, "POST", "/api/grants", body)
    assert status == 400, answer
    assert reason in answer["error"], answer
    assert stored(gw) == []


def test_writes_from_another_origin_or_host_are_refused(gw, key):
    body = {"subdomain": "api3", "key": key}
    assert call(gw, "POST", "/api/grants", body,
                headers={"Origin": "http://evil.test"})[0] == 403
    assert call(gw, "POST", "/api/grants", body, host="evil.test:%d" % gw.http_address[1],
                headers={"Origin": "http://evil.test:%d" % gw.http_address[1]})[0] == 403
    request = urllib.request.Request("http://127.0.0.1:%d/api/grants" % gw.http_address[1],
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 415
    assert call(gw, "POST", "/api/grants", b"[1, 2]")[0] == 400
    assert call(gw, "POST", "/api/grants", b"x" * 70000)[0] == 413
    assert call(gw, "PUT", "/api/grants", body)[0] == 405
    assert stored(gw) == []
    same_origin = {"Origin": "http://127.0.0.1:%d" % gw.http_address[1]}
    assert call(gw, "POST", "/api/grants", body, headers=same_origin)[0] == 200
    assert call(gw, "DELETE", "/api/grants/api3", headers=same_origin)[0] == 200


def test_post_an_invite_then_list_and_delete_it(gw):
    status, answer = call(gw, "POST", "/api/invites", {
        "subdomain": "api4", "ttl": 600, "policy": {"allow": ["127.0.0.1/32"]}})
    assert status == 200, answer
    invite = invitecode.decode(answer["code"])
    assert (invite.subdomain, invite.server_key, invite.gateways) == ("api4", gw.key, gw.gateway)
    assert answer["invite"]["state"] == "open" and "secret" not in json.dumps(answer["invite"])
    status, listed = call(gw, "GET", "/api/invites")
    assert [i["id"] for i in listed] == [invite.invite_id]
    assert call(gw, "POST", "/api/invites", {"subdomain": "api4", "ttl": 0})[0] == 409
    assert call(gw, "POST", "/api/invites", {"subdomain": "api4",
                                             "gateway": ["nope"]})[0] == 400
    for bad in ({"port": "x"}, {"port": 70000}, {"ttl": "soon"}, {"comment": "a\nb"},
                {"policy": {"mode": 5}}, {"policy": {"aliases": [5]}}, {"clear": [5]}):
        status, answer = call(gw, "POST", "/api/invites", dict({"subdomain": "api4"}, **bad))
        assert status in (400, 409), (bad, status, answer)
    assert call(gw, "DELETE", "/api/invites/" + invite.invite_id)[0] == 200
    assert call(gw, "DELETE", "/api/invites/" + invite.invite_id)[0] == 404


def test_off_loopback_the_write_api_needs_the_token(tmp_path, key):
    gw = Gateway(tmp_path / "gw", http="0.0.0.0:0", token="s3cret").start()
    body = {"subdomain": "api5", "key": key}
    assert call(gw, "POST", "/api/grants", body)[0] == 401
    assert call(gw, "GET", "/api/grants")[0] == 401
    assert call(gw, "POST", "/api/grants", body, token="wrong")[0] == 401
    assert call(gw, "POST", "/api/grants", body, token="s3cret")[0] == 200
    assert call(gw, "DELETE", "/api/grants/api5", token="s3cret")[0] == 200
    gw.proc.close()
