"""Access policy per grant, end to end: a real diglett-server with its Traefik hook (REST, and
etcd with a real etcd), the real Traefik binary, a real agent and backend, and diglett-admin
changing the policy of the live route. Basic auth, an allow list (two loopback source
addresses), forward auth to a small real auth server, an alias host, and a change that reaches
the route without a reconnect; bad input refused before the registry and Traefik.
"""

import base64
import http.client
import http.server
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.support.etcdfixture import etcd_server  # noqa: F401 (a fixture)
from tests.support.harness import Gateway, wait_until
from tests.support.hookfixtures import (
    HttpBackend,
    Traefik,
    body_for,
    serve_http,
    sha256,
    traefik,  # noqa: F401 (a fixture)
)

ROUTE_SLACK = 15.0  # seconds for a policy change to reach the live route (grants poll: 1 s)
PASSWORD = "correct horse"
OTHER_SOURCE = "127.0.0.2"  # loopback too: the allow list sees another source address


def apr1(password, salt="diglett1"):
    """An htpasswd apr1 hash, made by openssl (what `htpasswd -nm` makes)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl makes the htpasswd hashes: ./scripts/bootstrap --test installs it")
    return subprocess.run(["openssl", "passwd", "-apr1", "-salt", salt, password],
                          capture_output=True, text=True, check=True, timeout=10).stdout.strip()


def get(tf, host, source="127.0.0.1", headers=None, auth=None):
    """(status, body) of GET / on Traefik's web entrypoint, sent from ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", tf.web_port, timeout=5,
                                      source_address=(source, 0))
    sent = {"Host": host, **(headers or {})}
    if auth is not None:
        sent["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        conn.request("GET", "/", headers=sent)
        answer = conn.getresponse()
        return answer.status, answer.read()
    except OSError:
        return None, b""
    finally:
        conn.close()


def served(result, name="foo"):
    status, body = result
    return status == 200 and sha256(body) == sha256(body_for(name))


def wait_status(what, request, status, timeout=ROUTE_SLACK):
    started = time.monotonic()
    wait_until(lambda: request()[0] == status, timeout, interval=0.1,
               what="%s to answer %s" % (what, status))
    return time.monotonic() - started


class AuthServer:
    """forward-auth: 200 when the request carries ``X-Token: let-me-in``, else 401; it
    records every decision, so the test sees it asked once per request."""

    def __init__(self):
        self.decisions = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                allowed = self.headers.get("X-Token") == "let-me-in"
                outer.decisions.append(allowed)
                self.send_response(200 if allowed else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = serve_http(Handler)
        self.url = "http://127.0.0.1:%d/check" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def policy_gateway(tmp_path, traefik):  # noqa: F811
    sections = {"hooks": {"enabled": "traefik", "retry_max": "1"},
                "hook:traefik": {"api": traefik.api, "entrypoints": "web",
                                 "check_interval": "1", "settle": "3"}}
    gw = Gateway(tmp_path / "gw", sections=sections).start()
    backend = HttpBackend("foo")
    auth = AuthServer()
    yield gw, traefik, backend, auth
    auth.close()
    backend.close()


def grant_json(gw):
    return {g["subdomain"]: g["policy"] for g in json.loads(gw.admin("grants", "--json").stdout)}


def rest_router(tf, name="foo"):
    routers = [r for r in tf.routers() if r["name"] == "diglett-%s@rest" % name]
    return routers[0] if routers else None


def tcp_router(tf, name="foo"):
    try:
        with urllib.request.urlopen(tf.api + "/api/tcp/routers", timeout=5) as answer:
            routers = json.loads(answer.read())
    except OSError:  # HTTPError included: no tcp configuration yet
        return None
    found = [r for r in routers if r["name"] == "diglett-%s@rest" % name]
    return found[0] if found else None


@pytest.mark.timeout(150)
def test_policy_follows_the_grant_on_the_live_route(policy_gateway):
    gw, tf, backend, auth = policy_gateway
    key_file, key = gw.new_key("foo")
    entry = "alice:" + apr1(PASSWORD)
    gw.grant("foo", key, "--basic-auth", entry, "--alias", "www.customer.test")
    agent = gw.agent("foo", backend.address, key_file=key_file)
    session = gw.sessions()[0]["id"]
    foo = "foo.example.test"

    # basic auth: 401 without credentials, 200 with; the alias serves the same backend
    wait_status("foo with credentials", lambda: get(tf, foo, auth="alice:" + PASSWORD), 200)
    assert get(tf, foo)[0] == 401
    assert get(tf, foo, auth="alice:wrong")[0] == 401
    assert served(get(tf, foo, auth="alice:" + PASSWORD))
    assert served(get(tf, "www.customer.test", auth="alice:" + PASSWORD))
    assert get(tf, "www.customer.test")[0] == 401

    # a live change: basic auth off, an allow list of 127.0.0.1 on
    changed = time.monotonic()
    gw.admin("set", "foo", "--clear", "basic-auth", "--allow", "127.0.0.1/32")
    took = wait_status("foo from %s" % OTHER_SOURCE, lambda: get(tf, foo, OTHER_SOURCE), 403)
    print("allow list applied %.2f s after diglett-admin set" % (time.monotonic() - changed))
    assert took < ROUTE_SLACK
    assert served(get(tf, foo))  # 127.0.0.1, no credentials needed any more
    assert get(tf, "www.customer.test", OTHER_SOURCE)[0] == 403

    # forward auth decides per request
    gw.admin("set", "foo", "--clear", "allow", "--forward-auth", auth.url)
    wait_status("foo without a token", lambda: get(tf, foo, OTHER_SOURCE), 401)
    before = len(auth.decisions)
    assert served(get(tf, foo, OTHER_SOURCE, headers={"X-Token": "let-me-in"}))
    assert get(tf, foo, headers={"X-Token": "nope"})[0] == 401
    assert served(get(tf, foo, headers={"X-Token": "let-me-in"}))
    assert auth.decisions[before:] == [True, False, True]

    # back to no policy: open again
    gw.admin("set", "foo", "--clear", "all")
    wait_status("foo without any policy", lambda: get(tf, foo, OTHER_SOURCE), 200)
    assert rest_router(tf)["rule"] == "Host(`foo.example.test`)"

    # a grant of the other mode: its route moves to Traefik's tcp routers, allow list kept
    gw.admin("set", "foo", "--mode", "tcp", "--allow", "127.0.0.1/32")
    wait_until(lambda: tcp_router(tf) is not None and rest_router(tf) is None, ROUTE_SLACK,
               interval=0.1, what="foo's route to become a tcp router")
    router = tcp_router(tf)
    assert router["rule"] == "HostSNI(`foo.example.test`)" and router["status"] == "enabled"
    assert router["middlewares"] == ["diglett-allow-foo@rest"], router

    # none of this reconnected the agent
    assert [s["id"] for s in gw.sessions()] == [session]
    assert agent.stdout().count("tunnel up") == 1, agent.stdout()
    assert "Traceback" not in gw.proc.stderr()


BAD_INPUT = [
    (("--basic-auth", "alice:plain-password"), "not an htpasswd bcrypt"),
    (("--basic-auth", "al`ice:$apr1$x$" + "a" * 22), "basic-auth must be USER:HASH"),
    (("--allow", "10.0.0.1/24"), "host bits set"),
    (("--allow", "10.0.0.0/24`)"), "not an IP address"),
    (("--forward-auth", "http://auth`) || Host(`evil.test"), "not an http:// or https:// URL"),
    (("--forward-auth", "file:///etc/passwd"), "not an http:// or https:// URL"),
    (("--alias", "evil.test`) || Host(`x.test"), "is not a host name"),
    (("--alias", "bar.example.test"), "inside the tunnel domain"),
    (("--middleware", "x@file`)"), "not a Traefik middleware name"),
    (("--mode", "tcp", "--middleware", "gzip@file"), "mode tcp"),
]


@pytest.mark.timeout(120)
def test_bad_policy_input_is_refused_and_never_reaches_the_registry_or_traefik(
        policy_gateway):
    gw, tf, backend, _ = policy_gateway
    key_file, key = gw.new_key("foo")
    gw.grant("foo", key, "--alias", "www.customer.test")
    gw.agent("foo", backend.address, key_file=key_file)
    wait_until(lambda: served(get(tf, "www.customer.test")), ROUTE_SLACK, interval=0.1,
               what="the alias route")
    stored, rule = grant_json(gw), rest_router(tf)["rule"]
    for options, reason in BAD_INPUT:
        for command in (("set", "foo"), ("grant", "foo", "--key", key)):
            result = gw.admin(*command, *options, check=False)
            assert result.returncode == 1, (command, options, result.stdout)
            assert reason in result.stderr, (options, result.stderr)
            assert result.stderr.startswith("diglett-admin: error:"), result.stderr
    assert grant_json(gw) == stored
    time.sleep(2.5)  # two grant polls: nothing changed, nothing was pushed
    assert rest_router(tf)["rule"] == rule
    audit = json.loads(gw.admin("audit", "--name", "foo", "--json").stdout)
    actions = [entry["action"] for entry in audit]
    assert "policy" not in actions and actions.count("regrant") == 0, actions
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(60)
def test_an_alias_routes_to_one_name_only(tmp_path):
    gw = Gateway(tmp_path / "gw")
    _, key_foo = gw.new_key("foo")
    _, key_bar = gw.new_key("bar")
    gw.grant("foo", key_foo, "--alias", "www.customer.test")
    result = gw.admin("grant", "bar", "--key", key_bar, "--alias", "WWW.customer.test",
                      check=False)
    assert result.returncode == 1
    assert "alias www.customer.test already routes to foo" in result.stderr
    assert "bar" not in grant_json(gw)


@pytest.mark.timeout(150)
def test_the_etcd_hook_applies_the_policy_and_its_changes_live(tmp_path, etcd_server):  # noqa: F811
    tf = Traefik(tmp_path / "traefik", etcd=etcd_server.url).start()
    sections = {"hooks": {"enabled": "traefik-etcd", "retry_max": "1"},
                "hook:traefik-etcd": {"endpoints": etcd_server.url, "lease_ttl": "5",
                                      "keepalive": "1", "check_interval": "1",
                                      "entrypoints": "web"}}
    gw = Gateway(tmp_path / "gw", sections=sections).start()
    backend = HttpBackend("foo")
    try:
        key_file, key = gw.new_key("foo")
        gw.grant("foo", key, "--basic-auth", "alice:" + apr1(PASSWORD), "--alias",
                 "www.customer.test")
        gw.agent("foo", backend.address, key_file=key_file)
        session = gw.sessions()[0]["id"]
        foo = "foo.example.test"
        wait_status("foo with credentials (etcd)",
                    lambda: get(tf, foo, auth="alice:" + PASSWORD), 200)
        assert get(tf, foo)[0] == 401
        assert served(get(tf, "www.customer.test", auth="alice:" + PASSWORD))

        gw.admin("set", "foo", "--clear", "basic-auth", "--clear", "alias", "--allow",
                 "127.0.0.1/32")
        wait_status("foo from %s (etcd)" % OTHER_SOURCE, lambda: get(tf, foo, OTHER_SOURCE),
                    403)
        assert served(get(tf, foo))  # no credentials needed any more
        wait_status("the alias to go (etcd)", lambda: get(tf, "www.customer.test"), 404)
        assert [s["id"] for s in gw.sessions()] == [session]  # no reconnect
    finally:
        backend.close()
    assert "Traceback" not in gw.proc.stderr()
