"""diglett-admin as a real subprocess: against a tmp config and SQLite registry (grants, policy
options and their one-line errors that name the bad value, --clear, invites), and against a
running server (status explains a name, kick ends its session, the audit trail records both,
and the registry stays usable while 20 agents connect a second).

Why ~460 lines: one subject, diglett-admin: offline against a registry file and online against a
server, each test alone.
"""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import coincurve
import pytest

from diglett import __version__, crypto, invitecode, registry
from diglett.registry import Registry, SessionRow
from tests.support import harness, peers
from tests.support.harness import Gateway
from tests.support.hookfixtures import (  # noqa: F401 (fixture)
    HttpBackend,
    Traefik,
    recorder,
    routed,
    serve_http,
    succeeded,
    traefik,  # noqa: F401 (a fixture)
)

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


APR1 = "$apr1$diglett1$" + "b" * 22


def grants(conf):  # noqa: F811
    return {(g["subdomain"], g["key"]): g["policy"]
            for g in json.loads(ok(conf, "grants", "--json").stdout)}


@pytest.mark.timeout(60)
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


@pytest.mark.timeout(60)
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


@pytest.mark.timeout(60)
def test_invite_prints_one_code_with_the_server_key(conf, tmp_path):  # noqa: F811
    assert "server key is not created yet" in error_line(
        admin(conf, "invite", "foo", "--gateway", "gw.example.test:20000"))
    private = coincurve.PrivateKey()
    crypto.write_private_key(tmp_path / "server.key", private)
    assert "no live gateway" in error_line(admin(conf, "invite", "foo"))
    assert "--gateway: bad gateway 'gw.example.test': missing :PORT" in error_line(
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


def admin_json(gateway, *args):
    return json.loads(gateway.admin(*args, "--json").stdout)


@pytest.mark.timeout(90)
def test_status_kick_and_audit(tmp_path, traefik):  # noqa: F811
    script, _ = recorder(tmp_path, fail_for="foo")  # the script hook always fails for foo
    gateway = harness.Gateway(tmp_path / "gw", http="127.0.0.1:%d" % harness.free_port(),
                              sections={
                                  "hooks": {"enabled": "traefik, script", "retry_max": "1"},
                                  "hook:traefik": {"api": traefik.api, "check_interval": "1"},
                                  "hook:script": {"command": script},
                              }).start()
    backend = HttpBackend("foo")
    agent = gateway.agent("foo", backend.address)
    harness.wait_until(lambda: traefik.status("foo.example.test") == 200, 10,
                       what="the route of foo")

    def settled():
        report = admin_json(gateway, "status", "foo")
        hooks = report["hooks"]
        if (hooks.get("script") or {}).get("last_error") and \
                (hooks.get("traefik") or {}).get("state") == "done":
            return report
        return None

    report = harness.wait_until(settled, 10, what="the script's failure and Traefik's route")
    assert [g["fingerprint"] for g in report["grants"]] and report["host"] == "foo.example.test"
    assert report["session"]["port"] == agent.port
    assert "exited with status 1" in report["hooks"]["script"]["last_error"]
    assert report["hooks"]["traefik"]["state"] == "done"
    assert report["published"]["traefik"]["route"] == "Host(`foo.example.test`)"
    assert report["published"]["traefik"]["servers"] == ["http://127.0.0.1:%d" % agent.port]
    text = gateway.admin("status", "foo").stdout
    assert "Host(`foo.example.test`)" in text and "exited with status 1" in text

    kicked = gateway.admin("kick", "foo", "--delay", "30")
    assert "kicked session" in kicked.stdout
    agent.wait_for(r"KICKED\); reconnecting in 30\.0 s", 10)
    harness.wait_until(lambda: traefik.status("foo.example.test") == 404, 10,
                       what="the route to go away after the kick")
    assert gateway.sessions() == []
    assert admin_json(gateway, "status", "foo")["published"]["traefik"]["route"] is None

    entries = admin_json(gateway, "audit", "--name", "foo")
    actions = [entry["action"] for entry in entries]
    for action in ("grant", "session-start", "kick-request", "session-end", "hook-failed"):
        assert action in actions, actions
    end = next(e for e in entries if e["action"] == "session-end")
    assert "reason=kicked" in end["detail"] and "bytes_in=" in end["detail"]
    assert admin_json(gateway, "audit", "--since", "1h") and not admin_json(
        gateway, "audit", "--since", "2999-01-01")
    backend.close()


@pytest.mark.timeout(30)
def test_kick_of_a_name_that_is_not_connected_fails_clearly(gateway):
    result = gateway.admin("kick", "nobody", check=False)
    assert result.returncode == 1 and "not connected" in result.stderr


@pytest.mark.timeout(30)
def test_kick_without_a_running_server_says_so(tmp_path):
    gateway = harness.Gateway(tmp_path / "gw")  # never started
    started = time.monotonic()
    result = gateway.admin("kick", "foo", check=False)
    assert result.returncode == 1 and "no running server answered" in result.stderr
    assert time.monotonic() - started < 15


# ----- D6 (d): diglett-admin during 20 agent connects per second ----------------------------
def connect_loop(gw, keys, seconds, rate, results, stop):
    """Log in and hang up ``rate`` times a second for ``seconds``, cycling over ``keys``."""
    deadline = time.monotonic() + seconds
    number = 0
    while time.monotonic() < deadline and not stop.is_set() and number < seconds * rate:
        due = time.monotonic() + 1.0 / rate
        name, key_file = keys[number % len(keys)]
        number += 1
        try:
            agent, answer = peers.login(gw, key_file, name, timeout=5)
            results.append(type(answer).__name__)
            agent.close()
        except (OSError, AssertionError, ConnectionError) as exc:
            results.append("error: %s" % exc)
        time.sleep(max(0.0, due - time.monotonic()))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_admin_works_while_agents_connect_20_times_a_second(tmp_path):
    gw = Gateway(tmp_path / "gw").start()
    keys = []
    for number in range(4):
        key_file, public = gw.new_key("a%d" % number)
        gw.grant("a%d" % number, public)
        keys.append(("a%d" % number, key_file))
    spare = [gw.new_key("spare%d" % number)[1] for number in range(12)]
    results, stop = [], threading.Event()
    seconds = 8
    loop = threading.Thread(target=connect_loop, args=(gw, keys, seconds, 20, results, stop),
                            daemon=True)
    loop.start()
    admin_runs = []
    try:
        deadline = time.monotonic() + seconds
        number = 0
        while time.monotonic() < deadline and number < len(spare):
            for args in (("grant", "g%d" % number, "--key", spare[number]),
                         ("sessions", "--json"), ("grants",)):
                result = gw.admin(*args, check=False, timeout=20)
                admin_runs.append((args[0], result.returncode, result.stdout + result.stderr))
            number += 1
    finally:
        stop.set()
        loop.join(15)
    accepted = results.count("Accepted")
    print("%d logins (%d accepted) and %d admin commands in %d s" % (
        len(results), accepted, len(admin_runs), seconds))
    failed = [run for run in admin_runs if run[1] != 0 or "locked" in run[2].lower()]
    assert not failed, failed[:3]
    assert len(admin_runs) >= 6
    assert accepted >= 0.8 * len(results) and accepted >= 50, results[-10:]
    granted = gw.admin("grants").stdout
    assert all("g%d" % n in granted for n in range(len(admin_runs) // 3))
    assert "locked" not in gw.proc.stderr().lower()
