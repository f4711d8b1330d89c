"""diglett-admin as a real subprocess against a tmp config and a tmp SQLite database."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import coincurve
import pytest

from diglett import __version__, crypto, registry
from diglett.registry import Registry, SessionRow

pytestmark = pytest.mark.timeout(30)

SECRET = bytes([7]) * 32
KEY = crypto.public_hex(coincurve.PrivateKey(SECRET))
KEY_UNCOMPRESSED = coincurve.PrivateKey(SECRET).public_key.format(compressed=False).hex()
OTHER_KEY = crypto.public_hex(coincurve.PrivateKey(bytes([8]) * 32))


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "diglett.conf"
    path.write_text(
        "[server]\n"
        "domain = tunnel.example.test\n"
        "database = state/registry.db\n"  # relative to the config; state/ does not exist yet
        "key = server.key\n"
    )
    return path


def admin(conf, *args, env=None):
    command = [sys.executable, "-m", "diglett.cli.admin"]
    if conf is not None:
        command += ["-c", str(conf)]
    result = subprocess.run(command + list(args), capture_output=True, text=True, timeout=20,
                            env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(conf, *args):
    result = admin(conf, *args)
    assert result.returncode == 0, result.stderr
    return result


def error_line(result):
    """The single error line, after checking the exit code and that stdout is clean."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diglett-admin: error: "), result.stderr
    return lines[0]


def test_grant_before_the_first_server_start_then_list_as_json(conf, tmp_path):
    result = ok(conf, "grant", "Foo", "--key", KEY_UNCOMPRESSED, "--port", "30001",
                "--comment", "alice laptop")
    assert "foo.tunnel.example.test" in result.stdout
    assert crypto.fingerprint(KEY) in result.stdout and KEY not in result.stdout
    assert (tmp_path / "state" / "registry.db").exists()
    grants = json.loads(ok(conf, "grants", "--json").stdout)
    assert [(g["subdomain"], g["key"], g["port"], g["comment"]) for g in grants] == [
        ("foo", KEY, 30001, "alice laptop")
    ]
    assert grants[0]["created"].endswith("Z")


def test_grants_table_is_aligned_with_fingerprints(conf):
    ok(conf, "grant", "foo", "--key", KEY, "--comment", "first")
    ok(conf, "grant", "a-much-longer-name", "--key", OTHER_KEY, "--port", "30002")
    lines = ok(conf, "grants").stdout.splitlines()
    assert lines[0].split() == ["NAME", "KEY", "PORT", "CREATED", "(UTC)", "COMMENT", "POLICY"]
    assert len(lines) == 3
    key_column = lines[0].index("KEY")
    assert lines[1][key_column:].startswith(crypto.fingerprint(OTHER_KEY))
    assert lines[2][key_column:].startswith(crypto.fingerprint(KEY))
    assert KEY not in "".join(lines)


def test_revoke_then_revoke_again_fails(conf):
    ok(conf, "grant", "foo", "--key", KEY)
    ok(conf, "grant", "foo", "--key", OTHER_KEY)
    wrong = admin(conf, "revoke", "bar")
    assert "no grant of bar" in error_line(wrong)
    result = ok(conf, "revoke", "foo", "--key", KEY_UNCOMPRESSED)
    assert "revoked 1 grant of foo" in result.stdout and "within 2 s" in result.stdout
    assert "no grant of foo to key %s" % crypto.fingerprint(KEY) in error_line(
        admin(conf, "revoke", "foo", "--key", KEY))
    ok(conf, "revoke", "foo")
    assert json.loads(ok(conf, "grants", "--json").stdout) == []


def test_revoke_help_says_when_the_agent_is_disconnected(conf):
    assert "disconnects a connected agent within 2 s" in ok(conf, "revoke", "--help").stdout


def test_sessions_json_lists_active_sessions(conf, tmp_path):
    assert json.loads(ok(conf, "sessions", "--json").stdout) == []
    assert "no active sessions" in ok(conf, "sessions").stdout
    registry = Registry(str(tmp_path / "state" / "registry.db"))
    registry.record_session_start(SessionRow("00112233aabbccdd", "foo", KEY, "127.0.0.1", 30001,
                                             "192.0.2.7:51000", 1000.0, None, "active", None, "s1"))
    registry.record_session_start(SessionRow("00112233aabbccde", "bar", KEY, "127.0.0.1", 30002,
                                             "192.0.2.8:51000", 1001.0, None, "active", None, "s1"))
    registry.record_session_end("00112233aabbccde", "closed", 1002.0)
    registry.close()
    result = ok(conf, "sessions", "--json")
    assert result.stderr == ""
    sessions = json.loads(result.stdout)
    assert [(s["id"], s["subdomain"], s["port"], s["remote"], s["state"]) for s in sessions] == [
        ("00112233aabbccdd", "foo", 30001, "192.0.2.7:51000", "active")
    ]
    assert sessions[0]["started"] == "1970-01-01T00:16:40.000Z" and sessions[0]["ended"] is None
    table = ok(conf, "sessions").stdout
    assert "127.0.0.1:30001" in table and crypto.fingerprint(KEY) in table and "bar" not in table


def test_deliveries_lists_the_outbox_with_states_and_errors(conf, tmp_path):
    assert json.loads(ok(conf, "deliveries", "--json").stdout) == []
    registry = Registry(str(tmp_path / "state" / "registry.db"))
    row = SessionRow("00112233aabbccdd", "foo", KEY, "127.0.0.1", 30001, "192.0.2.7:51000",
                     1000.0, None, "active", None, "s1")
    event = {"event_id": "e1", "kind": "connect", "subdomain": "foo"}
    registry.record_session_start(row, [("webhook", event), ("script", dict(event))])
    webhook, script = sorted(registry.pending_deliveries("webhook") +
                             registry.pending_deliveries("script"), key=lambda d: d.hook != "webhook")
    registry.delivery_failed(webhook.id, 3, 2000.0, "receiver answered 500", dead=True)
    registry.delivery_done(script.id)
    registry.close()
    dead = json.loads(ok(conf, "deliveries", "--state", "dead", "--json").stdout)
    assert [(d["hook"], d["subdomain"], d["state"], d["attempts"], d["last_error"])
            for d in dead] == [("webhook", "foo", "dead", 3, "receiver answered 500")]
    table = ok(conf, "deliveries").stdout
    assert "receiver answered 500" in table and "script" in table and "done" in table


def test_info_without_and_with_a_server_key(conf, tmp_path):
    ok(conf, "grant", "foo", "--key", KEY)
    info = json.loads(ok(conf, "info", "--json").stdout)
    assert info["server_key"] is None
    assert not (tmp_path / "server.key").exists()  # info never creates the key
    assert "not created yet" in ok(conf, "info").stdout
    server_key = coincurve.PrivateKey()
    crypto.write_private_key(tmp_path / "server.key", server_key)
    info = json.loads(ok(conf, "info", "--json").stdout)
    assert info == {
        "version": __version__,
        "server_key": crypto.public_hex(server_key),
        "server_key_file": str(tmp_path / "server.key"),
        "domain": "tunnel.example.test",
        "database": str(tmp_path / "state" / "registry.db"),
        "schema_version": registry.migration_names()[-1][0],
        "grants": 1,
        "active_sessions": 0,
    }
    assert crypto.public_hex(server_key) in ok(conf, "info").stdout


def test_migrate_prints_what_it_applied_once(conf):
    first = ok(conf, "migrate").stdout
    latest = registry.migration_names()[-1][0]
    assert "applied 0001_initial" in first and "version %d" % latest in first
    second = ok(conf, "migrate").stdout
    assert "applied" not in second and "up to date" in second


@pytest.mark.parametrize(
    "args, expected",
    [
        (("grant", "foo.bar", "--key", KEY), "invalid subdomain 'foo.bar'"),
        (("grant", "foo_bar", "--key", KEY), "allowed: a-z, 0-9"),
        (("grant", "foo", "--key", "02" + "ab" * 31), "33 or 65 bytes"),
        (("grant", "foo", "--key", "zz"), "must be hex"),
        (("revoke", "foo", "--key", "04" + "00" * 64), "not a valid secp256k1 public key"),
    ],
)
def test_bad_input_is_one_error_line(conf, args, expected):
    assert expected in error_line(admin(conf, *args))


def test_pinned_port_conflict_is_one_error_line(conf):
    ok(conf, "grant", "foo", "--key", KEY, "--port", "30001")
    assert "port 30001 is already pinned to foo" in error_line(
        admin(conf, "grant", "bar", "--key", OTHER_KEY, "--port", "30001"))


def test_bad_config_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[server]\ndatabase = registry.db\ndatbase = typo.db\n")
    line = error_line(admin(bad, "grants"))
    assert "%s:3:" % bad in line and "datbase" in line


def test_missing_config_and_env_variable(tmp_path, conf):
    assert str(tmp_path / "nope.conf") in error_line(admin(tmp_path / "nope.conf", "grants"))
    env = dict(os.environ, DIGLETT_CONFIG=str(conf))
    result = admin(None, "grant", "foo", "--key", KEY, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state" / "registry.db").exists()


def test_usage_errors_exit_2(conf):
    assert admin(conf).returncode == 2
    assert admin(conf, "grant", "foo").returncode == 2  # --key is required
    assert admin(conf, "grant", "foo", "--key", KEY, "--port", "70000").returncode == 2


def test_console_script_version():
    script = Path(sys.executable).parent / "diglett-admin"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0
    assert result.stdout.strip() == "diglett-admin %s" % __version__


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the database to another user")
def test_warns_when_not_the_database_owner(conf, tmp_path):
    ok(conf, "grant", "foo", "--key", KEY)
    database = tmp_path / "state" / "registry.db"
    os.chown(database, 65534, 65534)
    result = ok(conf, "grants", "--json")
    assert json.loads(result.stdout)[0]["subdomain"] == "foo"  # stdout stays pure JSON
    assert "warning: %s is owned by" % database in result.stderr
    assert "sudo -u" in result.stderr


def test_locked_database_is_an_error_line_not_a_hang(conf, tmp_path):
    ok(conf, "grant", "foo", "--key", KEY)
    holder = sqlite3.connect(tmp_path / "state" / "registry.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        line = error_line(admin(conf, "grant", "bar", "--key", KEY))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "locked by another process" in line
