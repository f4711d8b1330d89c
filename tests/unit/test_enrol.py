"""Enrolment without processes: the code's known-answer vector and every way a code is bad,
the CONFIG ``enroll`` field as the gateway reads it, a redemption (and each refusal, with its
admission penalty) against a real registry, and the agent's enrolled-names file.
"""

import base64
import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from diglett import admission, crypto, invitecode
from diglett.cli import enroll as enroll_cli
from diglett.gateway import enrol
from diglett.gateway.authorize import Refusal
from diglett.gateway.fleet import GrantCache
from diglett.registry import Registry
from diglett.wire import ErrorCode
from tests.support.records import InlineDb

pytestmark = pytest.mark.timeout(20)
VECTOR = json.loads((Path(__file__).parents[1] / "vectors" / "invitecode.json").read_text())


def vector_invite():
    return invitecode.Invite(VECTOR["gateways"], VECTOR["server_key"], VECTOR["subdomain"],
                             VECTOR["invite_id"], VECTOR["secret"])


def test_the_code_matches_its_known_answer():
    code = invitecode.encode(vector_invite())
    assert code == VECTOR["code"]
    packed = code[len(invitecode.PREFIX):]
    assert base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)).hex() == VECTOR["bytes"]
    assert invitecode.decode(code) == vector_invite()
    assert invitecode.decode("  %s\n" % code) == vector_invite()  # pasted with whitespace
    assert VECTOR["secret"] not in repr(vector_invite())


def _forge(body_hex):
    """A code of ``body_hex`` with a correct checksum (what a deliberate forger makes)."""
    body = bytes.fromhex(body_hex)
    body += hashlib.sha256(body).digest()[:invitecode.CHECKSUM_SIZE]
    return invitecode.PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


@pytest.mark.parametrize("code, reason", [
    ("", "starts with"),
    ("dg1-", "damaged"),
    ("dg1-!!!!", "damaged"),
    (VECTOR["code"][:-1], "damaged"),
    (VECTOR["code"][:30] + "x" + VECTOR["code"][31:], "damaged"),
    ("dg1-" + "A" * 3000, "starts with"),
    (_forge("02" + VECTOR["bytes"][2:-8]), "version 2"),
    (_forge(VECTOR["bytes"][:-8 - 20]), "truncated"),
    (_forge(VECTOR["bytes"][:2] + "02" + "00" * 32 + VECTOR["bytes"][68:-8]), "bad value"),
    (_forge(VECTOR["bytes"][:116] + "03665f6f" + VECTOR["bytes"][124:-8]), "bad value"),
])
def test_bad_codes_say_what_is_wrong(code, reason):
    with pytest.raises(invitecode.InvalidCode, match=reason):
        invitecode.decode(code)


@pytest.mark.parametrize("request_, refused", [
    ({"subdomain": "foo"}, None),
    ({"enroll": "x"}, True),
    ({"enroll": {"invite": "0123", "secret": "00" * 16}}, True),
    ({"enroll": {"invite": "01" * 8, "secret": "00" * 15}}, True),
    ({"enroll": {"invite": "01" * 8, "secret": "ZZ" * 16}}, True),
    ({"enroll": {"invite": 1, "secret": None}}, True),
])
def test_the_enroll_field_is_checked_before_the_registry(request_, refused):
    found = enrol.enrolment(request_)
    if refused is None:
        assert found is None
    else:
        assert isinstance(found, Refusal) and found.penalty == admission.PENALTY_AUTHFAIL


class FakeServer:
    def __init__(self, registry):
        self.db = InlineDb()
        self.registry = registry
        self.grants = GrantCache(self.db, registry)
        self.grants.reload()


@pytest.fixture
def server(tmp_path):
    registry = Registry(str(tmp_path / "registry.db"))
    yield FakeServer(registry)
    registry.close()


def test_a_redemption_binds_the_grant_and_a_second_one_is_refused(server):
    row, secret = server.registry.create_invite("foo", 60, {"allow": ("10.0.0.0/8",)})
    key = crypto.public_hex(crypto.generate_private_key())
    request = {"subdomain": "foo", "enroll": {"invite": row.id, "secret": secret}}
    assert enrol.redeem(server, "foo", key, request) is None
    assert server.grants.grants[("foo", key)].policy.allow == ("10.0.0.0/8",)  # usable now
    other = crypto.public_hex(crypto.generate_private_key())
    refusal = enrol.redeem(server, "foo", other, request)
    assert refusal.code == ErrorCode.UNAUTHORIZED
    assert refusal.penalty == admission.PENALTY_AUTHFAIL  # counts toward the penalty box
    assert "already used" in refusal.reason
    assert [g.key for g in server.registry.grants()] == [key]


def test_refusals_name_the_reason_and_grant_nothing(server):
    row, secret = server.registry.create_invite("foo", 1)
    key = crypto.public_hex(crypto.generate_private_key())

    def attempt(name, invite_id, secret_):
        return enrol.redeem(server, name, key, {"enroll": {"invite": invite_id,
                                                           "secret": secret_}})

    assert "secret is wrong" in attempt("foo", row.id, "00" * 16).reason
    assert "invite unknown" in attempt("foo", "00" * 8, secret).reason
    assert "is for 'foo', not 'bar'" in attempt("bar", row.id, secret).reason
    time.sleep(1.05)
    assert "expired" in attempt("foo", row.id, secret).reason
    assert server.registry.grants() == []
    assert server.registry.invites()[0].used is None


def test_only_hashes_of_secrets_are_stored(server, tmp_path):
    _, secret = server.registry.create_invite("foo", 60)
    dump = "\n".join(sqlite3.connect(tmp_path / "registry.db").iterdump())
    assert secret not in dump


def test_the_enrolled_file_remembers_one_gateway_per_name(tmp_path):
    path = tmp_path / "enrolled"
    assert enroll_cli.gateway_of(path, "foo") is None
    enroll_cli.remember(path, "foo", "gw1:20000")
    enroll_cli.remember(path, "bar", "gw2:20000,gw3:20000")
    enroll_cli.remember(path, "foo", "gw4:20000")
    assert enroll_cli.gateway_of(path, "foo") == "gw4:20000"
    assert enroll_cli.gateway_of(path, "bar") == "gw2:20000,gw3:20000"
    assert path.read_text().count("foo") == 1


def test_a_code_naming_a_bad_gateway_is_refused():
    for gateways in ("gw.test", "gw.test:0", "gw.test:99999", "gw.test:1,", ":20000",
                     "ftp://gw.test:21", "tls://gw.test/path"):
        forged = invitecode.encode(invitecode.Invite(gateways, VECTOR["server_key"], "foo",
                                                     VECTOR["invite_id"], VECTOR["secret"]))
        with pytest.raises(invitecode.InvalidCode, match="bad gateway"):
            invitecode.decode(forged)
    assert [str(g) for g in invitecode.gateways_of("[::1]:20000,gw.test:20001")] == [
        "[::1]:20000", "gw.test:20001"]


def test_a_code_carries_the_gateways_through_443_as_the_agent_writes_them():
    gateways = "wss://gw.test/diglett,tls://gw.test,gw.test:20000"
    code = invitecode.encode(invitecode.Invite(gateways, VECTOR["server_key"], "foo",
                                               VECTOR["invite_id"], VECTOR["secret"]))
    invite = invitecode.decode(code)
    assert invite.gateways == gateways
    assert [(g.scheme, g.port, g.path) for g in invitecode.gateways_of(invite.gateways)] == [
        ("wss", 443, "/diglett"), ("tls", 443, ""), ("tcp", 20000, "")]
