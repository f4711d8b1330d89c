"""diglett.policy on its own: what a grant's access policy may hold, and the reasons a value
is refused. Every refused value is one that would break out of a Traefik rule or store a
password; every accepted one comes back in canonical form.
"""

import pytest

from diglett.policy import Policy, PolicyError

pytestmark = pytest.mark.timeout(10)

BCRYPT = "$2y$05$" + "a" * 53
APR1 = "$apr1$diglett1$" + "b" * 22


def test_the_empty_policy_changes_nothing():
    assert Policy().summary() == "-"
    assert Policy.from_json({}) == Policy() == Policy.from_json(None)


def test_values_are_stored_in_canonical_form():
    policy = Policy().updated({
        "aliases": ("WWW.Customer.COM.", "www.customer.com", "shop.customer.com"),
        "allow": ("203.0.113.0/24", "127.0.0.1", "2001:DB8::/32"),
        "basic_auth": ("alice:" + BCRYPT, "bob:" + APR1),
        "forward_auth": "https://auth.example.com/oauth2/auth?rd=x",
        "middlewares": ("ratelimit@file", "gzip"),
        "mode": "http",
    })
    assert policy.aliases == ("www.customer.com", "shop.customer.com")  # repeats dropped
    assert policy.allow == ("203.0.113.0/24", "127.0.0.1/32", "2001:db8::/32")
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.summary().split()[:3] == ["mode=http", "alias=www.customer.com",
                                            "alias=shop.customer.com"]
    assert BCRYPT not in policy.summary()  # hashes stay out of listings


def test_updated_replaces_given_fields_and_clears_named_ones():
    policy = Policy(aliases=("a.test",), allow=("10.0.0.0/8",))
    changed = policy.updated({"allow": ("192.0.2.0/24",)}, clear=["aliases"])
    assert changed == Policy(allow=("192.0.2.0/24",))
    with pytest.raises(PolicyError, match="unknown policy option"):
        policy.updated({"colour": "red"})


@pytest.mark.parametrize("changes, reason", [
    ({"aliases": ("evil.test`) || Host(`x.test",)}, "is not a host name"),
    ({"aliases": ("localhost",)}, "is not a host name"),  # one label
    ({"aliases": ("-x.test",)}, "is not a host name"),
    ({"aliases": ("ä.test",)}, "is not a host name"),
    ({"aliases": tuple("h%d.test" % i for i in range(17))}, "at most 16 aliases"),
    ({"basic_auth": ("alice:hunter2",)}, "plain passwords are never stored"),
    ({"basic_auth": ("alice:$2y$05$short",)}, "not an htpasswd bcrypt"),
    ({"basic_auth": ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",)}, "not an htpasswd bcrypt"),
    ({"basic_auth": ("alice:" + APR1 + "\nbob:" + APR1,)}, "not an htpasswd bcrypt"),
    ({"basic_auth": ("al:ice:" + APR1,)}, "not an htpasswd bcrypt"),
    ({"basic_auth": (":" + APR1,)}, "USER:HASH"),
    ({"basic_auth": "alice:" + APR1}, "must be a list"),
    ({"allow": ("10.0.0.1/24",)}, "host bits set"),
    ({"allow": ("10.0.0.0/33",)}, "not an IP address"),
    ({"allow": ("any",)}, "not an IP address"),
    ({"forward_auth": "ftp://auth.test/"}, "not an http:// or https:// URL"),
    ({"forward_auth": "http:///path"}, "not an http:// or https:// URL"),
    ({"forward_auth": "http://auth.test/ x"}, "not an http:// or https:// URL"),
    ({"forward_auth": "http://auth.test:99999/"}, "not an http:// or https:// URL"),
    ({"forward_auth": "http://auth.test/`"}, "not an http:// or https:// URL"),
    ({"forward_auth": "http://auth.test/" + "a" * 2048}, "not an http:// or https:// URL"),
    ({"middlewares": ("diglett-auth-foo",)}, "not starting with 'diglett-'"),
    ({"middlewares": ("a`b",)}, "not a Traefik middleware name"),
    ({"mode": "udp"}, "mode must be http or tcp"),
    ({"mode": "tcp", "basic_auth": ("alice:" + APR1,)}, "mode tcp"),
    ({"mode": "tcp", "forward_auth": "http://auth.test/"}, "mode tcp"),
])
def test_bad_values_are_refused_with_the_reason(changes, reason):
    with pytest.raises(PolicyError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        Policy().updated(changes)


def test_tcp_may_keep_an_allow_list():
    assert Policy(mode="tcp", allow=("10.0.0.0/8",)).allow == ("10.0.0.0/8",)


@pytest.mark.parametrize("data", [
    {"aliases": ["x.test`)"]}, {"allow": ["nope"]}, {"mode": "udp"}, ["not", "an object"],
    {"basic_auth": ["alice:plain"]},
])
def test_from_json_checks_again(data):
    with pytest.raises(PolicyError):
        Policy.from_json(data)
