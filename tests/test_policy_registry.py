"""Grant policies in the registry: stored by grant and set, merged option by option, listed,
refused before any write when bad, an alias held by one name only, a pre-0005 database
upgraded in place, and a row edited by hand into something unsafe failing closed.
"""

import json
import sqlite3

import pytest

from diglett import registry
from diglett.policy import OPTION_NAMES, Policy, PolicyError
from diglett.registry import Registry, RegistryError
from tests.test_registry import K1, K2

pytestmark = pytest.mark.timeout(20)
APR1 = "$apr1$diglett1$" + "b" * 22


@pytest.fixture
def reg(tmp_path):
    r = Registry(str(tmp_path / "registry.db"))
    yield r
    r.close()


def test_a_grant_stores_its_policy_and_lists_it(reg):
    grant = reg.grant("foo", K1, changes={"aliases": ("www.customer.test",),
                                          "basic_auth": ("alice:" + APR1,)})
    assert grant.policy == Policy(aliases=("www.customer.test",), basic_auth=("alice:" + APR1,))
    (listed,) = reg.grants()
    assert listed.policy == grant.policy
    assert listed.to_json()["policy"]["aliases"] == ["www.customer.test"]
    assert reg.grant_snapshot()[("foo", K1)].policy == grant.policy
    assert reg.find_grant("foo", K1).policy == grant.policy


def test_regrant_keeps_options_not_given_and_set_edits_them(reg):
    reg.grant("foo", K1, changes={"aliases": ("a.test",), "allow": ("10.0.0.0/8",)})
    regrant = reg.grant("foo", K1, comment="new", changes={"allow": ("192.0.2.0/24",)})
    assert regrant.policy == Policy(aliases=("a.test",), allow=("192.0.2.0/24",))
    reg.grant("foo", K2)
    updated = reg.set_policy("foo", changes={"mode": "tcp"}, clear=["aliases"])
    assert [(g.key, g.policy) for g in updated] == sorted([
        (K1, Policy(mode="tcp", allow=("192.0.2.0/24",))), (K2, Policy(mode="tcp"))])
    assert reg.set_policy("foo", K2, clear=["mode"])[0].policy == Policy()
    assert reg.find_grant("foo", K1).comment == "new"  # set keeps the rest of the grant
    assert reg.set_policy("nobody", changes={"mode": "http"}) == []
    actions = [e.action for e in reg.audit_entries(subdomain="foo")]
    assert actions.count("policy") == 3


def test_bad_values_never_reach_the_database(reg):
    reg.grant("foo", K1, changes={"allow": ("10.0.0.0/8",)})
    before = reg.grants()
    for call in (lambda: reg.grant("foo", K1, changes={"allow": ("10.0.0.1/8",)}),
                 lambda: reg.grant("bar", K2, changes={"basic_auth": ("bob:plain",)}),
                 lambda: reg.set_policy("foo", changes={"aliases": ("x`.test",)}),
                 lambda: reg.set_policy("foo", changes={"mode": "tcp",
                                                        "forward_auth": "http://a.test/"})):
        with pytest.raises(PolicyError):
            call()
    assert reg.grants() == before


def test_an_alias_routes_to_one_name(reg):
    reg.grant("foo", K1, changes={"aliases": ("www.customer.test",)})
    reg.grant("foo", K2, changes={"aliases": ("www.customer.test",)})  # same name: fine
    with pytest.raises(RegistryError, match="already routes to foo"):
        reg.grant("bar", K2, changes={"aliases": ("shop.test", "www.customer.test")})
    assert [g.subdomain for g in reg.grants()] == ["foo", "foo"]  # bar was not written


def test_set_refusing_an_alias_changes_nothing(reg):
    reg.grant("foo", K1, changes={"aliases": ("www.customer.test",)})
    reg.grant("bar", K2)
    with pytest.raises(RegistryError):
        reg.set_policy("bar", changes={"aliases": ("www.customer.test",)})
    assert reg.find_grant("bar", K2).policy == Policy()


def test_a_hand_edited_unsafe_policy_fails_closed(tmp_path, reg, caplog):
    reg.grant("foo", K1, changes={"basic_auth": ("alice:" + APR1,)})
    reg.grant("bar", K2)
    with sqlite3.connect(tmp_path / "registry.db") as conn:
        conn.execute("UPDATE grants SET policy = ? WHERE subdomain = 'foo'",
                     (json.dumps({"aliases": ["x.test`) || Host(`evil.test"]}),))
    reg.close()
    assert list(reg.grant_snapshot()) == [("bar", K2)]  # the agent of foo is refused
    assert "the policy stored for foo is invalid" in caplog.text
    with pytest.raises(RegistryError, match="--clear all"):
        reg.set_policy("foo", changes={"mode": "http"})
    reg.set_policy("foo", clear=list(OPTION_NAMES.values()), changes={"mode": "http"})
    assert reg.grant_snapshot()[("foo", K1)].policy == Policy(mode="http")


def test_a_database_from_before_0005_gets_the_empty_policy(tmp_path):
    path = tmp_path / "old.db"
    old = Registry(str(path), migrate=False)
    old._versions.create_table(safe=True)
    for number, name in registry.migration_names():
        if number >= 5:
            break
        module = __import__("diglett.migrations." + name, fromlist=["up"])
        module.up(old.db)
        old._versions.create(version=number, name=name, applied=0)
    old.db.execute_sql("INSERT INTO grants (subdomain, key, port, comment, created) "
                       "VALUES ('foo', ?, NULL, '', 0)", (K1,))
    old.close()
    new = Registry(str(path))
    assert new.find_grant("foo", K1).policy == Policy()
    assert new.grants()[0].to_json()["policy"]["aliases"] == []
    new.close()
