"""diglett-admin's policy and enrolment commands as real subprocesses against a tmp registry:
grant and set with options, the POLICY column, --clear, one-line errors that name the bad
value (nothing written), and invite, invites and uninvite (a server key but no server).
"""

import json

import coincurve
import pytest

from diglett import crypto, invitecode
from tests.test_admin import KEY, OTHER_KEY, admin, conf, error_line, ok  # noqa: F401

pytestmark = pytest.mark.timeout(60)
APR1 = "$apr1$diglett1$" + "b" * 22


def grants(conf):  # noqa: F811
    return {(g["subdomain"], g["key"]): g["policy"]
            for g in json.loads(ok(conf, "grants", "--json").stdout)}


def test_grant_and_set_edit_the_policy_option_by_option(conf):  # noqa: F811
    result = ok(conf, "grant", "foo", "--key", KEY, "--alias", "www.customer.test",
                "--basic-auth", "alice:" + APR1, "--mode", "http")
    assert "policy: mode=http alias=www.customer.test auth=alice" in result.stdout
    ok(conf, "grant", "foo", "--key", OTHER_KEY)
    result = ok(conf, "set", "foo", "--allow", "10.0.0.0/8", "--allow", "192.0.2.1",
                "--clear", "basic-auth")
    assert "within a few seconds" in result.stdout
    policies = grants(conf)
    assert policies[("foo", KEY)]["allow"] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert policies[("foo", KEY)]["aliases"] == ["www.customer.test"]  # kept
    assert policies[("foo", KEY)]["basic_auth"] == []
    assert policies[("foo", OTHER_KEY)]["allow"] == ["10.0.0.0/8", "192.0.2.1/32"]
    ok(conf, "set", "foo", "--key", OTHER_KEY, "--clear", "all")
    assert grants(conf)[("foo", OTHER_KEY)]["allow"] == []
    table = ok(conf, "grants").stdout
    assert "alias=www.customer.test allow=10.0.0.0/8 allow=192.0.2.1/32" in table
    assert APR1 not in table


@pytest.mark.parametrize("args, words", [
    (("set", "foo"), "nothing to change"),
    (("set", "nobody", "--mode", "tcp"), "no grant of nobody"),
    (("set", "foo", "--clear", "allow", "--allow", "10.0.0.0/8"), "--clear allow and a new"),
    (("set", "foo", "--allow", "10.0.0.1/8"), "host bits set"),
    (("set", "foo", "--basic-auth", "alice"), "USER:HASH"),
    (("set", "foo", "--alias", "shop.tunnel.example.test"), "inside the tunnel domain"),
    (("set", "foo", "--forward-auth", "http://a.test/\"x"), "not an http:// or https://"),
    (("grant", "bar", "--key", OTHER_KEY, "--basic-auth", "bob:secret"), "plain passwords"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(conf, args, words):  # noqa: F811
    ok(conf, "grant", "foo", "--key", KEY)
    before = grants(conf)
    assert words in error_line(admin(conf, *args))
    assert grants(conf) == before


def test_invite_prints_one_code_with_the_server_key(conf, tmp_path):  # noqa: F811
    assert "server key is not created yet" in error_line(
        admin(conf, "invite", "foo", "--gateway", "gw.example.test:20000"))
    private = coincurve.PrivateKey()
    crypto.write_private_key(tmp_path / "server.key", private)
    assert "no live gateway" in error_line(admin(conf, "invite", "foo"))
    assert "--gateway must be HOST:PORT" in error_line(
        admin(conf, "invite", "foo", "--gateway", "gw.example.test"))
    result = ok(conf, "invite", "Foo", "--ttl", "2h", "--gateway", "gw1.example.test:20000",
                "--gateway", "gw2.example.test:20000", "--allow", "10.0.0.0/8")
    (code,) = result.stdout.split()
    invite = invitecode.decode(code)
    assert invite.subdomain == "foo"
    assert invite.server_key == crypto.public_hex(private)
    assert invite.gateways == "gw1.example.test:20000,gw2.example.test:20000"
    (listed,) = json.loads(ok(conf, "invites", "--json").stdout)
    assert listed["id"] == invite.invite_id and listed["state"] == "open"
    assert listed["policy"]["allow"] == ["10.0.0.0/8"]
    assert invite.secret not in ok(conf, "invites").stdout
    assert "bad value" not in admin(conf, "invite", "foo", "--ttl", "0h").stderr
    assert admin(conf, "invite", "foo", "--ttl", "0h").returncode == 2  # argparse: a usage error
    ok(conf, "uninvite", invite.invite_id)
    assert "no invite" in error_line(admin(conf, "uninvite", invite.invite_id))
    assert json.loads(ok(conf, "invites", "--json").stdout) == []
