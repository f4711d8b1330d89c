"""diglett.registry against real SQLite files: migrations, grants and their policies, sessions,
gateways, locks, errors.

Tests that take ``reg`` or ``db_url`` run here on SQLite and again on PostgreSQL in
tests/e2e/test_registry_postgresql.py; ``sqlite_reg`` ones test SQLite's own behaviour (WAL,
data_version, file locks). Grant policies: stored by grant and set, merged option by option,
refused before any write when bad, an alias held by one name only, a pre-0005 database
upgraded in place, and a row edited by hand into something unsafe failing closed.

Why ~510 lines: one subject, the registry's public methods, one block per table; each test
starts from an empty database.
"""

import dataclasses
import json
import os
import sqlite3
import tempfile
import threading
import time

import pytest
from playhouse.schema_diff import diff_models

from diglett import crypto, registry
from diglett.names import InvalidName
from diglett.policy import OPTION_NAMES, Policy, PolicyError
from diglett.registry import Registry, RegistryError
from tests.support.records import K1, K2, make_key, session

pytestmark = pytest.mark.timeout(20)




@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "registry.db"


@pytest.fixture
def db_url(db_path):
    """The registry's database: a SQLite file (tests/e2e/test_registry_postgresql.py runs the
    tests that take ``reg`` or ``db_url`` again on PostgreSQL)."""
    return str(db_path)


@pytest.fixture
def reg(db_url):
    registry_ = Registry(db_url)
    yield registry_
    registry_.close()


@pytest.fixture
def sqlite_reg(db_path):
    registry_ = Registry(str(db_path))
    yield registry_
    registry_.close()



# --- schema ---------------------------------------------------------------------------------


def test_migrations_apply_once_and_are_idempotent(db_path):
    first = Registry(str(db_path), migrate=False)
    assert first.schema_version() == 0
    known = registry.migration_names()
    assert first.migrate() == [name for _, name in known]
    assert first.migrate() == []
    assert first.schema_version() == known[-1][0]
    first.close()
    second = Registry(str(db_path))  # migrates on construction: nothing left to do
    assert second.migrate() == []
    rows = sqlite3.connect(db_path).execute("SELECT version, name FROM schema_version").fetchall()
    assert rows == known


def test_migration_files_are_numbered_and_discovered():
    found = registry.migration_names()
    assert found[0] == (1, "0001_initial")
    assert [number for number, _ in found] == list(range(1, len(found) + 1))


def test_models_and_migrations_agree(db_url):
    reg = Registry(db_url)
    db = reg.db
    assert not diff_models(db, list(registry.MODELS)), str(diff_models(db, list(registry.MODELS)))
    # diff_models ignores nullability and primary keys: compare them column by column.
    for model in registry.MODELS:
        table = model._meta.table_name
        in_db = {c.name: (c.null, c.primary_key) for c in db.get_columns(table)}
        in_model = {f.column_name: (f.null, f.primary_key) for f in model._meta.sorted_fields}
        assert in_db == in_model, table
    reg.close()


def test_newer_schema_is_refused_with_upgrade_hint(db_path):
    Registry(str(db_path)).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (999, '0999_future', 0)")
    with pytest.raises(RegistryError, match="schema version 999.*upgrade diglett"):
        Registry(str(db_path))


def test_sqlite_url_and_wal_mode(tmp_path):
    path = tmp_path / "url.db"
    reg = Registry("sqlite:///%s" % path)
    reg.grant("foo", K1)
    assert reg.path == path
    reg.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT subdomain FROM grants").fetchall() == [("foo",)]


def test_unknown_url_scheme_is_a_registry_error():
    with pytest.raises(RegistryError, match="nosuchdb://"):
        Registry("nosuchdb://host/db")


# --- grants ---------------------------------------------------------------------------------


def test_grant_normalizes_name_and_uncompressed_or_hybrid_keys(reg):
    point = make_key(1).public_key
    uncompressed = point.format(compressed=False).hex()
    hybrid = ("06" if int(uncompressed[-1], 16) % 2 == 0 else "07") + uncompressed[2:]
    for text in (uncompressed, hybrid.upper(), K1):
        grant = reg.grant("Foo", text, comment="laptop")
        assert (grant.subdomain, grant.key) == ("foo", K1)
    assert len(reg.grants()) == 1
    assert reg.find_grant("foo", uncompressed) == reg.grants()[0]
    assert reg.find_grant("foo", K2) is None


def test_grant_refuses_bad_names_and_keys(reg):
    with pytest.raises(InvalidName):
        reg.grant("foo.bar", K1)
    with pytest.raises(crypto.KeyFormatError):
        reg.grant("foo", "02" + "00" * 32)  # x = 0 is not on the curve
    with pytest.raises(RegistryError, match="port"):
        reg.grant("foo", K1, port=70000)
    with pytest.raises(RegistryError, match="comment"):
        reg.grant("foo", K1, comment="two\nlines")
    assert reg.grants() == []


def test_regrant_updates_port_and_comment(reg):
    first = reg.grant("foo", K1, port=30001, comment="old")
    second = reg.grant("foo", K1, port=30002, comment="new")
    assert (second.port, second.comment, second.created) == (30002, "new", first.created)
    assert reg.grants() == [second]


def test_pinned_port_conflict_names_the_holder(reg):
    reg.grant("foo", K1, port=30001)
    with pytest.raises(RegistryError, match="port 30001 is already pinned to foo"):
        reg.grant("bar", K2, port=30001)
    with pytest.raises(RegistryError, match="already pinned"):
        reg.grant("foo", K2, port=30001)  # same name, other key: still one port per grant
    assert [g.subdomain for g in reg.grants()] == ["foo"]
    reg.grant("bar", K2)  # unpinned grants never collide
    reg.grant("baz", K2)
    assert len(reg.grants()) == 3


def test_revoke_one_key_or_every_key_and_audit(reg):
    reg.grant("foo", K1, actor="alice")
    reg.grant("foo", K2, actor="alice")
    reg.grant("bar", K1, actor="alice")
    uncompressed = make_key(1).public_key.format(compressed=False).hex()
    assert reg.revoke("FOO", uncompressed, actor="bob") == 1
    assert reg.revoke("foo", K1) == 0
    assert reg.revoke("foo") == 1
    assert reg.revoke("nothing") == 0
    assert [(g.subdomain, g.key) for g in reg.grants()] == [("bar", K1)]
    log = [(e.actor, e.action, e.subdomain, e.key) for e in reversed(reg.audit_entries())]
    assert log[:3] == [("alice", "grant", "foo", K1), ("alice", "grant", "foo", K2),
                       ("alice", "grant", "bar", K1)]
    assert log[3] == ("bob", "revoke", "foo", K1)
    assert log[4][1:] == ("revoke", "foo", None)
    assert len(log) == 5  # revokes that removed nothing are not logged


def test_grant_snapshot_sees_own_and_other_connections_writes(sqlite_reg, db_path):
    reg = sqlite_reg
    reg.grant("foo", K1)
    snapshot = reg.grant_snapshot()
    assert list(snapshot) == [("foo", K1)]
    assert isinstance(snapshot[("foo", K1)], registry.Grant)
    snapshot.clear()  # the caller's copy; the cache is not affected
    assert list(reg.grant_snapshot()) == [("foo", K1)]
    other = Registry(str(db_path))  # e.g. diglett-admin in another process
    other.revoke("foo")
    assert reg.grant_snapshot() == {}
    reg.grant("bar", K2)
    assert list(reg.grant_snapshot()) == [("bar", K2)]
    with sqlite3.connect(db_path) as conn:  # even a hand edit is noticed
        conn.execute("DELETE FROM grants")
    assert reg.grant_snapshot() == {}
    reg.close()  # a new connection restarts data_version: the cache must not survive it
    assert reg.grant_snapshot() == {}
    reg.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO grants (subdomain, key, comment, created) "
                     "VALUES ('baz', ?, '', 0)", (K1,))
    assert list(reg.grant_snapshot()) == [("baz", K1)]


def test_results_are_frozen_dataclasses_not_peewee_objects(reg):
    grant = reg.grant("foo", K1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grant.port = 1
    assert type(grant) is registry.Grant
    assert grant.to_json()["created"].endswith("Z")


# --- sessions -------------------------------------------------------------------------------


def test_session_start_end_and_json(reg):
    row = session()
    assert reg.record_session_start(row) is True
    assert reg.active_sessions() == [row]
    data = row.to_json()
    assert data["started"] == "1970-01-01T00:16:40.000Z"
    assert {"id", "subdomain", "key", "host", "port", "remote", "state", "reason",
            "ended"} <= set(data)
    assert reg.record_session_start(row) is False  # a retried write is harmless
    assert reg.record_session_start(dataclasses.replace(row, port=1)) is False
    assert reg.active_sessions() == [row]  # the first record wins
    assert reg.record_session_end(row.id, "closed", 1010.0) is True
    assert reg.record_session_end(row.id, "again", 1020.0) is False  # first end wins
    assert reg.active_sessions() == []


def test_end_stale_sessions_spares_the_current_instance(reg):
    old = session("0000000000000001", instance="server-1")
    mine = session("0000000000000002", subdomain="bar", instance="server-2")
    reg.record_session_start(old)
    reg.record_session_start(mine)
    ended = reg.end_stale_sessions("server-2")
    assert [(r.id, r.state, r.reason) for r in ended] == [(old.id, "ended", "stale")]
    assert ended[0].ended is not None and ended[0].to_json()["ended"].endswith("Z")
    assert reg.active_sessions() == [mine]
    assert reg.end_stale_sessions("server-2") == []


def test_usable_from_other_threads_with_their_own_connections(reg):
    reg.grant("foo", K1)
    results = []

    def worker():
        reg.grant("bar", K2)  # a write and a read from a thread that did not open it
        results.append(sorted(reg.grant_snapshot()))
        reg.close()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert results == [[("bar", K2), ("foo", K1)]]
    assert len(reg.grant_snapshot()) == 2  # the main thread sees the worker's commit


def test_last_port_is_the_latest_sessions_port(reg):
    assert reg.last_port("foo") is None
    reg.record_session_start(session("0000000000000001", port=30001, started=100.0))
    reg.record_session_start(session("0000000000000002", port=30007, started=200.0))
    reg.record_session_start(session("0000000000000003", subdomain="bar", port=30009,
                                     started=300.0))
    assert reg.last_port("FOO") == 30007
    assert reg.last_ports() == {"foo": 30007, "bar": 30009}


# --- failures -------------------------------------------------------------------------------


def test_lock_held_elsewhere_fails_fast_instead_of_hanging(sqlite_reg, db_path):
    reg = sqlite_reg
    reg.grant("foo", K1)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        with pytest.raises(RegistryError, match="locked by another process") as info:
            reg.grant("bar", K2)
        assert time.monotonic() - start < 1.0
        assert str(db_path) in str(info.value)
        assert list(reg.grant_snapshot()) == [("foo", K1)]  # WAL: readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    reg.grant("bar", K2)  # and it recovers once the lock is gone
    assert len(reg.grants()) == 2


def test_short_lock_is_ridden_out_by_retries(sqlite_reg, db_path):
    reg = sqlite_reg
    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    release = threading.Timer(0.08, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        reg.grant("foo", K1)  # locked for 80 ms: longer than the busy timeout, within retries
    finally:
        release.join()
        holder.close()
    assert len(reg.grants()) == 1


def test_missing_directory_is_explained_or_created(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "registry.db"
    with pytest.raises(RegistryError, match="directory .*dir does not exist"):
        Registry(str(path))
    Registry(str(path), create_dirs=True).close()
    assert path.exists()


def test_not_a_database_is_explained(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="not a usable SQLite database"):
        Registry(str(path))


def test_read_only_database_gives_a_clear_error():
    # root ignores file modes, so as root the write runs with effective uid nobody, in a
    # folder of /tmp that nobody can reach (pytest's tmp_path is private to root).
    with tempfile.TemporaryDirectory(prefix="diglett-ro-") as folder:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "registry.db")
        reg = Registry(path)
        reg.grant("foo", K1)
        reg.close()
        os.chmod(path, 0o444)
        reg = Registry(path, migrate=False)
        if os.geteuid() == 0:
            os.seteuid(65534)
        try:
            with pytest.raises(RegistryError) as info:
                reg.grant("bar", K2)
            reg.close()
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
    message = str(info.value)
    assert path in message
    assert "read-only" in message or "cannot open" in message, message


# --- several gateways on one registry ----------------------------------------------------------


def test_end_stale_sessions_touches_only_this_gateways_previous_run(reg):
    old = session("0000000000000001", instance="run-1", gateway="gw1")
    other = session("0000000000000002", subdomain="bar", instance="run-9", gateway="gw2")
    reg.record_session_start(old)
    reg.record_session_start(other)
    ended = reg.end_stale_sessions("run-2", gateway="gw1")
    assert [(r.id, r.reason, r.gateway) for r in ended] == [(old.id, "stale", "gw1")]
    assert reg.active_sessions() == [other]
    assert reg.active_sessions(gateway="gw1") == []


def test_sessions_of_gateways_not_seen_are_ended_and_queued_for_the_sweeper(reg):
    assert reg.gateway_seen("gw1", "run-1", "127.0.0.1:20000") is None
    assert reg.gateway_seen("gw2", "run-2", "127.0.0.1:20001") is None
    assert reg.gateway_seen("gw2", "run-2", "127.0.0.1:20001") == "run-2"
    dead = session("0000000000000001", instance="run-1", gateway="gw1")
    alive = session("0000000000000002", subdomain="bar", instance="run-2", gateway="gw2")
    legacy = session("0000000000000003", subdomain="baz", instance="run-0")
    for row in (dead, alive, legacy):
        reg.record_session_start(row)
    ended = reg.end_sessions_of_dead_gateways("gw2", 30)  # rows from before gateways
    assert [(r.id, r.reason) for r in ended] == [(legacy.id, "stale")]
    assert [r.id for r in reg.active_sessions()] == [dead.id, alive.id]
    time.sleep(0.3)
    reg.gateway_seen("gw2", "run-2", "127.0.0.1:20001")
    event = {"event_id": "e1", "kind": "disconnect"}
    ended = reg.end_sessions_of_dead_gateways("gw2", 0.25, lambda row: [("webhook", event)])
    assert [(r.id, r.reason) for r in ended] == [(dead.id, "stale")]
    assert reg.active_sessions() == [alive]
    assert reg.pending_deliveries("webhook", gateway="gw1") == []  # gw1 is gone: gw2 delivers
    assert [d.session for d in reg.pending_deliveries("webhook", gateway="gw2")] == [dead.id]
    late = session("0000000000000004", subdomain="qux", instance="run-1", gateway="gw1")
    reg.record_session_start(late)
    reg.gateway_seen("gw2", "run-2", "127.0.0.1:20001")
    assert reg.end_sessions_of_dead_gateways("gw1", 0.25) == []  # never the caller's own
    counts = {g.gateway_id: (g.instance, g.sessions) for g in reg.gateways()}
    assert counts == {"gw1": ("run-1", 1), "gw2": ("run-2", 1)}
    assert reg.gateway_seen("gw2", "run-3", "127.0.0.1:20001") == "run-2"  # a restart


def test_outbox_last_ports_and_kicks_are_per_gateway(reg):
    event = {"event_id": "e1", "kind": "connect"}
    mine = session("0000000000000001", port=30001, started=100.0, gateway="gw1")
    theirs = session("0000000000000002", port=30002, started=200.0, gateway="gw2")
    reg.record_session_start(mine, [("script", event)])
    reg.record_session_start(theirs, [("script", dict(event, event_id="e2"))])
    assert [d.session for d in reg.pending_deliveries("script", gateway="gw1")] == [mine.id]
    assert len(reg.pending_deliveries("script")) == 2
    assert reg.last_ports() == {"foo": 30002}
    assert reg.last_ports(gateway="gw1") == {"foo": 30001}
    kick = reg.request_kick("foo", 5)  # addressed to the newest active session's gateway
    assert reg.pending_kicks(gateway="gw1") == []
    assert [k[0] for k in reg.pending_kicks(gateway="gw2")] == [kick]
    reg.kick_handled(kick, "kicked session x")
    reg.kick_handled(kick, "not connected")  # a late second answer does not overwrite
    assert reg.kick_result(kick) == "kicked session x"
    anyone = reg.request_kick("nobody", 5)
    assert [k[0] for k in reg.pending_kicks(gateway="gw1")] == [anyone]
    assert [r.id for r in reg.active_sessions_of(["foo", "bar"])] == [mine.id, theirs.id]


def test_timestamps_keep_their_precision(reg):
    """peewee's FloatField is REAL (4 bytes) in PostgreSQL unless told otherwise."""
    row = session(started=1795699113.7659283)
    reg.record_session_start(row)
    assert reg.active_sessions()[0].started == row.started


APR1 = "$apr1$diglett1$" + "b" * 22


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


def test_a_hand_edited_unsafe_policy_fails_closed(tmp_path, sqlite_reg, caplog):
    reg = sqlite_reg  # edited by hand with sqlite3 below
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
