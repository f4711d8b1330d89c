"""End-to-end hooks with real processes: Traefik routes that follow the agents (also across a
kill -9 of the server, a restart of Traefik, and a Traefik that comes up after the agent),
webhook deliveries that survive a receiver outage and server restarts, script hooks that
fail, hang or flood, and graceful shutdown.

Each test runs a real diglett-server (tests.support.harness.Gateway with hook sections), real
agents, and the real Traefik binary or a real HTTP receiver or real scripts
(tests.support.hookfixtures). Where the hooks issue names a time users should see, the test
allows slack and prints the measured figure.

Why ~570 lines: one subject, the hooks end to end; the Traefik, webhook and script blocks share
the fixtures of tests.support.hookfixtures.
"""

import hashlib
import hmac
import json
import re
import signal
import sqlite3
import subprocess
import time

import pytest

from tests.support import harness, hookfixtures
from tests.support.harness import Gateway, connect, wait_until
from tests.support.hookfixtures import (
    HttpBackend,
    Receiver,
    Traefik,
    read_log,
    recorder,
    routed,
    succeeded,
    traefik,  # noqa: F401 (a fixture)
    wait_gone,
    write_script,
)

SHUTDOWN_TIMEOUT = float(harness.TEST_SERVER_OPTIONS["shutdown_timeout"])
ROUTE_SLACK = 10.0  # seconds allowed for what users should see within ~2 s
STALE_SLACK = 10.0  # seconds after a restart for stale cleanup (D1: within 5 s)
SECRET = "s3cret-for-tests"
FAST_RETRY = {"retry_max": "1"}  # [hooks]: retries every second, so tests stay short
EVENT_FIELDS = {"event", "subdomain", "host", "address", "port", "agent_key", "session",
                "reason", "event_id", "time"}
SCRIPT_VARIABLES = {"DIGLETT_" + name.upper() for name in EVENT_FIELDS - {"time"}}


# ----- helpers ------------------------------------------------------------------------------
def traefik_sections(tf, *extra_hooks, check_interval="1", **hooks):
    sections = {"hooks": {"enabled": ", ".join(("traefik",) + extra_hooks), **FAST_RETRY,
                          **hooks},
                "hook:traefik": {"api": tf.api, "entrypoints": "web",
                                 "check_interval": check_interval, "settle": "3"}}
    return sections


def script_section(command, timeout="5"):
    return {"command": str(command), "timeout": timeout}



def wait_routed(tf, name, timeout=ROUTE_SLACK):
    started = time.monotonic()
    wait_until(lambda: routed(tf, name), timeout, interval=0.05, what="route to %s" % name)
    return time.monotonic() - started


def wait_404(tf, name, timeout=ROUTE_SLACK, started=None):
    """Seconds since ``started`` (default: now) until ``name`` answers 404."""
    started = time.monotonic() if started is None else started
    wait_until(lambda: tf.status("%s.example.test" % name) == 404, timeout, interval=0.05,
               what="%s to answer 404" % name)
    return time.monotonic() - started


def start_http_agent(gw, name, backends, key_file=None):
    backend = backends.setdefault(name, HttpBackend(name))
    return gw.agent(name, backend.address, key_file=key_file)


def outbox(gw):
    """Every outbox row, oldest first, read straight from the SQLite file."""
    db = sqlite3.connect("file:%s?mode=ro" % (gw.workdir / "registry.db"), uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM outbox ORDER BY id")]
    finally:
        db.close()


def session_rows(gw):
    db = sqlite3.connect("file:%s?mode=ro" % (gw.workdir / "registry.db"), uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM sessions ORDER BY started")]
    finally:
        db.close()


@pytest.fixture
def backends():
    made = {}
    yield made
    for backend in made.values():
        backend.close()


# ----- Traefik ------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_traefik_routes_follow_agents(tmp_path, traefik, backends):
    gw = Gateway(tmp_path / "gw", sections=traefik_sections(traefik)).start()
    assert traefik.status("foo.example.test") == 404

    started = time.monotonic()
    foo = start_http_agent(gw, "foo", backends)
    up = time.monotonic() - started
    routed_after = wait_routed(traefik, "foo")
    print("foo: agent up in %.2f s, routed by Traefik %.2f s later" % (up, routed_after))

    bar = start_http_agent(gw, "bar", backends)
    print("bar: routed %.2f s after its agent was up" % wait_routed(traefik, "bar"))
    assert routed(traefik, "foo"), "publishing bar removed foo (the PUT must hold all sessions)"
    rules = sorted(r["rule"] for r in traefik.routers() if r["name"].endswith("@rest"))
    assert rules == ["Host(`bar.example.test`)", "Host(`foo.example.test`)"]

    stopped = time.monotonic()
    foo.stop()
    gone = wait_404(traefik, "foo", started=stopped)
    print("foo: route gone %.2f s after its agent stopped" % gone)
    assert routed(traefik, "bar"), "removing foo removed bar too"

    stopped = time.monotonic()
    bar.stop()  # the last one: Traefik ignores an empty PUT, so this needs explicit empty maps
    gone = wait_404(traefik, "bar", started=stopped)
    print("bar (the last route): gone %.2f s after its agent stopped" % gone)
    assert not [r for r in traefik.routers() if r["name"].endswith("@rest")]
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(120)
def test_kill9_server_stale_routes_removed_and_new_route_kept(tmp_path, traefik, backends):
    script, log = recorder(tmp_path)
    sections = traefik_sections(traefik, "script")
    sections["hook:script"] = script_section(script)
    gw = Gateway(tmp_path / "gw", sections=sections).start()
    agents = {name: start_http_agent(gw, name, backends) for name in ("foo", "bar")}
    for name in agents:
        wait_routed(traefik, name)
    wait_until(lambda: len(succeeded(log)) == 2, 10, what="two connects in the script log")
    connects = {env["DIGLETT_SUBDOMAIN"]: env for env in succeeded(log)}

    gw.proc.kill()  # kill -9: no session ends, the registry keeps them active
    for agent in agents.values():
        agent.kill()  # kept away: their backoff is far longer than this
    restarted = time.monotonic()
    gw.restart()

    def stale_logged():
        return {env["DIGLETT_SUBDOMAIN"]: env for env in succeeded(log)
                if env["DIGLETT_REASON"] == "stale"}

    stale = wait_until(lambda: len(stale_logged()) == 2 and stale_logged(), STALE_SLACK,
                       what="script: disconnect reason=stale for foo and bar")
    print("stale disconnects in the script log %.2f s after the restart began"
          % (time.monotonic() - restarted))
    for name in ("foo", "bar"):
        assert stale[name]["DIGLETT_EVENT"] == "disconnect"
        assert stale[name]["DIGLETT_SESSION"] == connects[name]["DIGLETT_SESSION"]
        assert stale[name]["DIGLETT_PORT"] == connects[name]["DIGLETT_PORT"]
        print("%s: 404 %.2f s after the restart began"
              % (name, wait_404(traefik, name, timeout=STALE_SLACK, started=restarted)))
    assert not [row for row in session_rows(gw) if row["state"] == "active"]
    with pytest.raises(OSError):  # nothing listens on bar's old tunnel port
        connect(int(connects["bar"]["DIGLETT_PORT"]), timeout=2).close()

    # foo comes back: its new route must survive the stale cleanup (which must not flap it)
    start_http_agent(gw, "foo", backends, key_file=gw.workdir / "foo.key")
    print("foo: routed again %.2f s after its agent was up" % wait_routed(traefik, "foo"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert routed(traefik, "foo"), "the new route of foo was removed"
        time.sleep(0.1)
    assert traefik.status("bar.example.test") == 404
    assert [r["name"] for r in traefik.routers() if r["name"].endswith("@rest")] == \
        ["diglett-foo@rest"]
    foo_events = [(e["DIGLETT_EVENT"], e["DIGLETT_REASON"]) for e in succeeded(log)
                  if e["DIGLETT_SUBDOMAIN"] == "foo"]
    assert foo_events == [("connect", ""), ("disconnect", "stale"), ("connect", "")]


@pytest.mark.timeout(90)
def test_traefik_restart_routes_come_back_without_reconnect(tmp_path, traefik, backends):
    gw = Gateway(tmp_path / "gw", sections=traefik_sections(traefik, check_interval="1")).start()
    agents = [start_http_agent(gw, name, backends) for name in ("foo", "bar")]
    for name in ("foo", "bar"):
        wait_routed(traefik, name)

    killed = time.monotonic()
    traefik.restart()  # Traefik forgets the REST configuration
    back = time.monotonic()
    for name in ("foo", "bar"):
        wait_routed(traefik, name, timeout=ROUTE_SLACK)
    print("both routes back %.2f s after Traefik's API answered again (%.2f s after the kill; "
          "check_interval 1 s)" % (time.monotonic() - back, time.monotonic() - killed))
    for agent in agents:
        assert len(harness.TUNNEL_UP.findall(agent.stdout())) == 1, "an agent reconnected"
    assert "pushing them again" in gw.proc.stderr()


# ----- webhook ------------------------------------------------------------------------------
def verify_request(record):
    """Check one webhook request: signature, event id header, body fields; returns the body."""
    headers, raw = record["headers"], record["body"]
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", headers["x-diglett-signature"])
    assert hmac.compare_digest(headers["x-diglett-signature"], expected), "bad signature"
    body = json.loads(raw)
    assert set(body) == EVENT_FIELDS
    assert headers["x-diglett-event-id"] == body["event_id"]
    assert headers["content-type"] == "application/json"
    return body


@pytest.mark.timeout(120)
def test_webhook_outage_and_server_restarts_lose_nothing(tmp_path, echo_backend):
    rx = Receiver("500")
    try:
        sections = {"hooks": {"enabled": "webhook", **FAST_RETRY},
                    "hook:webhook": {"url": rx.url, "secret": SECRET, "timeout": "1"}}
        gw = Gateway(tmp_path / "gw", sections=sections).start()
        first = [gw.agent(name, echo_backend.address) for name in ("a0", "a1")]
        wait_until(lambda: len(rx.requests) >= 1, 10, what="a first (refused) delivery")
        rx.set_mode("hang")  # held past the hook's timeout: a failure, retried
        wait_until(lambda: any(r["mode"] == "hang" for r in rx.requests), 10,
                   what="a held delivery")
        rx.set_mode("down")
        for agent in first:
            agent.stop()
        wait_until(lambda: sum(r["state"] == "ended" for r in session_rows(gw)) == 2, 10,
                   what="a0 and a1 ended")
        assert gw.proc.stop() == 0  # SIGTERM with deliveries pending
        gw.restart()
        late = gw.agent("a2", echo_backend.address)
        wait_until(lambda: any(r["subdomain"] == "a2" for r in outbox(gw)), 10,
                   what="a2's connect queued")
        gw.proc.kill()  # kill -9: a2's disconnect comes as reason stale at the next start
        late.kill()
        gw.restart()
        assert not rx.accepted(), "the receiver was never up"

        up = time.monotonic()
        rx.set_mode("ok")
        sessions = {row["id"]: row["subdomain"] for row in session_rows(gw)}
        assert len(sessions) == 3
        expected = {(kind, session) for session in sessions for kind in ("connect", "disconnect")}

        def delivered():
            return {(body["event"], body["session"]) for body in rx.accepted()}

        wait_until(lambda: delivered() >= expected, 20, interval=0.1, what="every event")
        print("all %d events delivered %.2f s after the receiver came up; %d requests in all"
              % (len(expected), time.monotonic() - up, len(rx.requests)))
        wait_until(lambda: not [r for r in outbox(gw) if r["state"] != "done"], 5,
                   what="an empty outbox")
        assert delivered() == expected

        by_id = {}
        for record in rx.requests:
            by_id.setdefault(record["headers"]["x-diglett-event-id"], []).append(record)
        assert len(by_id) == len(expected), "one event id per event"
        for copies in by_id.values():
            assert len({r["body"] for r in copies}) == 1, "a retry changed the body"
        duplicates = sum(len([r for r in copies if r["status"] == 200]) - 1
                         for copies in by_id.values())
        print("duplicates accepted: %d" % duplicates)

        bodies = [verify_request(r) for r in rx.requests if r["status"] == 200]
        reasons = {(b["subdomain"], b["event"]): b["reason"] for b in bodies}
        assert reasons == {("a0", "connect"): "", ("a1", "connect"): "", ("a2", "connect"): "",
                           ("a0", "disconnect"): "agent-left", ("a1", "disconnect"): "agent-left",
                           ("a2", "disconnect"): "stale"}
        for body in bodies:
            assert body["host"] == body["subdomain"] + ".example.test"
            assert body["address"] == "127.0.0.1" and body["port"] > 0
            assert re.fullmatch(r"[0-9a-f]{66}", body["agent_key"])
            assert re.fullmatch(r"[0-9a-f]{32}", body["event_id"])
        for name in ("a0", "a1", "a2"):  # per subdomain in order: connect first
            kinds = [b["event"] for b in bodies if b["subdomain"] == name]
            assert kinds.index("connect") < kinds.index("disconnect")
    finally:
        rx.close()


# ----- script hook --------------------------------------------------------------------------
def script_gateway(tmp_path, script, timeout="5", **hooks):
    sections = {"hooks": {"enabled": "script", **FAST_RETRY, **hooks},
                "hook:script": script_section(script, timeout)}
    return Gateway(tmp_path / "gw", sections=sections).start()


@pytest.mark.timeout(60)
def test_script_gets_environment_and_stdin(tmp_path, echo_backend):
    script, log = recorder(tmp_path)
    gw = script_gateway(tmp_path, script)
    key_file, public = gw.new_key("foo")
    gw.grant("foo", public)
    agent = gw.agent("foo", echo_backend.address, key_file=key_file)
    wait_until(lambda: succeeded(log), 10, what="the connect in the script log")
    agent.stop()
    wait_until(lambda: len(succeeded(log)) == 2, 10, what="the disconnect in the script log")

    (row,) = session_rows(gw)
    entries = read_log(log)
    assert [e["env"]["DIGLETT_EVENT"] for e in entries] == ["connect", "disconnect"]
    for entry, reason in zip(entries, ("", "agent-left")):
        env = entry["env"]
        assert set(env) == SCRIPT_VARIABLES
        assert env["DIGLETT_SUBDOMAIN"] == "foo"
        assert env["DIGLETT_HOST"] == "foo.example.test"
        assert env["DIGLETT_ADDRESS"] == row["host"] == "127.0.0.1"
        assert env["DIGLETT_PORT"] == str(row["port"]) == str(agent.port)
        assert env["DIGLETT_AGENT_KEY"] == public
        assert env["DIGLETT_SESSION"] == row["id"]
        assert env["DIGLETT_REASON"] == reason
        assert re.fullmatch(r"[0-9a-f]{32}", env["DIGLETT_EVENT_ID"])
        stdin = json.loads(entry["stdin"])
        assert set(stdin) == EVENT_FIELDS
        assert {"DIGLETT_" + k.upper(): str(v) for k, v in stdin.items() if k != "time"} == env
        assert abs(stdin["time"] - entry["time"]) < 30
        # the server's own environment does not leak (only a few locale/path variables)
        assert set(entry["keys"]) - SCRIPT_VARIABLES <= {"PATH", "LANG", "LC_ALL", "TZ",
                                                         "LC_CTYPE"}
    assert entries[0]["env"]["DIGLETT_EVENT_ID"] != entries[1]["env"]["DIGLETT_EVENT_ID"]


@pytest.mark.timeout(60)
def test_failing_script_is_retried_until_it_works(tmp_path, echo_backend):
    script, log = recorder(tmp_path)
    (tmp_path / (log.name + ".fail")).write_text("2")  # the next two runs exit 1
    gw = script_gateway(tmp_path, script)
    agent = gw.agent("foo", echo_backend.address)
    wait_until(lambda: succeeded(log), 15, what="the connect to succeed at last")
    runs = read_log(log)
    assert [r["failed"] for r in runs] == [True, True, False]
    assert len({r["env"]["DIGLETT_EVENT_ID"] for r in runs}) == 1, "retries are the same event"
    gaps = [b["time"] - a["time"] for a, b in zip(runs, runs[1:])]
    print("retry gaps (retry_max 1 s): %s" % ", ".join("%.2f s" % g for g in gaps))
    assert all(0.5 < gap < 5 for gap in gaps)
    assert "exited with status 1" in gw.proc.stderr()

    agent.stop()  # the next event of the name comes after, in order
    wait_until(lambda: len(succeeded(log)) == 2, 10, what="the disconnect")
    assert [e["DIGLETT_EVENT"] for e in succeeded(log)] == ["connect", "disconnect"]
    expected = [("connect", "done", 2), ("disconnect", "done", 0)]
    # the script has run; its outcome reaches the outbox a moment later
    wait_until(lambda: [(r["kind"], r["state"], r["attempts"]) for r in outbox(gw)] == expected,
               5, what="the outbox to record both deliveries as done")


# A script that hangs: it records its pid and a child's, and both sleep with MARKER (argv[1])
# in their command lines, so the test can tell whether anything of it is left.
HANGING = r"""
import os, subprocess, sys, time
marker, pids = sys.argv[1], sys.argv[2]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", marker])
with open(pids, "a") as out:
    out.write("%d %d\n" % (os.getpid(), child.pid))
time.sleep(3600)
"""


def alive(pid):
    try:
        state = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(90)
def test_hanging_script_is_killed_with_its_group_and_never_blocks_the_tunnel(tmp_path,
                                                                             echo_backend):
    marker = "diglett-hang-%d-%d" % (time.time_ns(), id(tmp_path))
    pids = tmp_path / "pids"
    script = write_script(tmp_path, "hang.py", HANGING)
    gw = script_gateway(tmp_path, "%s %s %s" % (script, marker, pids), timeout="1")
    try:
        first = gw.agent("alpha", echo_backend.address)
        wait_until(lambda: pids.exists() and pids.read_text(), 10, what="the hook running")

        # while the hook hangs, is killed and retried: data flows, another agent connects
        with connect(first.port) as sock:
            latencies = []
            deadline = time.monotonic() + 3.5  # spans a timeout, a kill and a retry
            while time.monotonic() < deadline:
                latencies += harness.round_trips(sock, 20)
            started = time.monotonic()
            second = gw.agent("beta", echo_backend.address)
            joined = time.monotonic() - started
            with connect(second.port) as other:
                harness.round_trips(other, 5)
            latencies += harness.round_trips(sock, 50)
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        print("echo round trips during a hanging hook: %d, p99 %.1f ms, max %.1f ms; "
              "another agent up in %.2f s" % (len(latencies), p99 * 1000, latencies[-1] * 1000,
                                              joined))
        assert p99 < 0.1, "tunnel data slowed down by a hanging hook"
        assert joined < 5

        runs = wait_until(lambda: len(pids.read_text().split("\n")) > 3 and pids.read_text(),
                          10, what="the hook retried after its timeout")
        script_pid, child_pid = map(int, runs.split("\n")[0].split())
        assert not alive(script_pid), "the timed-out script is still running"
        assert not alive(child_pid), "the timed-out script's child is still running"
        assert "timed out after 1 s (process group killed)" in gw.proc.stderr()

        # SIGTERM while an attempt runs that would outlast the shutdown: nothing of it may stay
        assert gw.proc.stop(timeout=20) == 0
        config = gw.config_path.read_text()
        gw.config_path.write_text(config.replace("timeout = 1\n", "timeout = 60\n"))
        count = len(pids.read_text().split("\n"))
        gw.restart()  # the pending deliveries run again at once
        wait_until(lambda: len(pids.read_text().split("\n")) > count, 10, what="a new attempt")
        stopped = time.monotonic()
        assert gw.proc.stop(timeout=20) == 0
        took = time.monotonic() - stopped
        print("SIGTERM with a hanging hook: exit after %.2f s" % took)
        assert took <= SHUTDOWN_TIMEOUT + 3, "a hanging hook held up the shutdown"
        gone = wait_gone(marker, 5)
        print("no process of the hook left %.2f s after the server exited" % gone)
    finally:
        hookfixtures.kill_marked(marker)


FLOOD = r"""
import sys
chunk = b"x" * (1 << 20)
for _ in range(50):
    sys.stdout.buffer.write(chunk)
"""


@pytest.mark.timeout(60)
def test_script_flooding_stdout_keeps_server_memory_bounded(tmp_path, echo_backend):
    script = write_script(tmp_path, "flood.py", FLOOD)
    gw = script_gateway(tmp_path, script, timeout="20")
    before = harness.vm_rss(gw.proc.pid)
    gw.agent("foo", echo_backend.address)
    wait_until(lambda: [r for r in outbox(gw) if r["state"] == "done"], 20,
               what="the flooding hook to finish")
    growth = harness.vm_rss(gw.proc.pid) - before
    print("server RSS grew by %.1f MiB while a hook wrote 50 MiB" % (growth / 2**20))
    assert growth < 20 * 2**20
    assert "hook=script subdomain=foo connect output: " in gw.proc.stderr()
    assert len(gw.proc.stderr()) < 1 << 20, "the script's output was logged whole"


@pytest.mark.timeout(60)
def test_always_failing_delivery_becomes_dead_and_others_flow(tmp_path, echo_backend):
    command, log = recorder(tmp_path, fail_for="broken")
    gw = script_gateway(tmp_path, command, max_attempts="2")
    gw.agent("broken", echo_backend.address)
    dead = wait_until(lambda: [r for r in outbox(gw) if r["state"] == "dead"], 15,
                      what="a dead delivery")
    assert [(r["hook"], r["subdomain"], r["kind"], r["attempts"]) for r in dead] == \
        [("script", "broken", "connect", 2)]
    assert "exited with status 1" in dead[0]["last_error"]
    assert "hook=script subdomain=broken connect is dead after 2 attempts" in gw.proc.stderr()

    gw.agent("fine", echo_backend.address)
    wait_until(lambda: succeeded(log), 10, what="the next name's event")
    assert [e["DIGLETT_SUBDOMAIN"] for e in succeeded(log)] == ["fine"]
    assert len([e for e in read_log(log) if e["env"]["DIGLETT_SUBDOMAIN"] == "broken"]) == 2


# ----- graceful shutdown --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigterm_ends_sessions_and_lets_the_script_unpublish(tmp_path, echo_backend):
    command, log = recorder(tmp_path)
    (tmp_path / (log.name + ".delay")).write_text("0.5")  # a slow hook
    gw = script_gateway(tmp_path, command)
    agents = [gw.agent(name, echo_backend.address) for name in ("foo", "bar")]
    wait_until(lambda: len(succeeded(log)) == 2, 10, what="both connects")

    started = time.monotonic()
    gw.proc.signal(signal.SIGTERM)
    code = gw.proc.wait(SHUTDOWN_TIMEOUT + 10)
    took = time.monotonic() - started
    print("SIGTERM -> exit %d after %.2f s (shutdown_timeout %.0f s)"
          % (code, took, SHUTDOWN_TIMEOUT))
    assert code == 0
    assert took <= SHUTDOWN_TIMEOUT + 3
    ended = {(e["DIGLETT_SUBDOMAIN"], e["DIGLETT_REASON"]) for e in succeeded(log)
             if e["DIGLETT_EVENT"] == "disconnect"}
    assert ended == {("foo", "shutdown"), ("bar", "shutdown")}
    assert {(r["subdomain"], r["state"], r["reason"]) for r in session_rows(gw)} == \
        {("foo", "ended", "shutdown"), ("bar", "ended", "shutdown")}
    assert [r["state"] for r in outbox(gw)] == ["done"] * 4, "work left for the next start"
    for agent in agents:
        assert agent.popen.poll() is None, "an agent exited instead of backing off"


# ----- configuration errors -----------------------------------------------------------------
def run_server(gw, *extra):
    return subprocess.run(harness.command("diglett-server") + ["-c", str(gw.config_path),
                                                               *extra],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sections, words", [
    ({"hooks": {"enabled": "nosuchhook"}}, ["nosuchhook", "not installed"]),
    ({"hooks": {"enabled": "webhook"}, "hook:webhook": {"secret": "x"}}, ["url"]),
    ({"hooks": {"enabled": "webhook"}}, ["url"]),
    ({"hooks": {"enabled": "traefik"}, "hook:traefik": {"api": "http://127.0.0.1:1",
                                                       "mode": "udp"}}, ["mode"]),
    ({"hooks": {"enabled": "script"}, "hook:script": {"command": "/bin/true",
                                                     "timout": "3"}}, ["timout"]),
], ids=["unknown-hook", "webhook-without-url", "webhook-without-section", "traefik-bad-mode",
        "script-typo"])
def test_bad_hook_config_fails_check(tmp_path, sections, words):
    gw = Gateway(tmp_path / "gw", sections=sections)
    result = run_server(gw, "--check")
    assert result.returncode == 2, result
    assert str(gw.config_path) in result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_non_executable_script_is_refused_at_start(tmp_path):
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\nexit 0\n")  # not chmod +x
    gw = Gateway(tmp_path / "gw", sections={"hooks": {"enabled": "script"},
                                            "hook:script": {"command": str(script)}})
    for extra in (["--check"], []):
        result = run_server(gw, *extra)
        assert result.returncode == 2, result
        assert str(gw.config_path) in result.stderr
        assert "not an executable" in result.stderr and str(script) in result.stderr
        assert "Traceback" not in result.stderr


# ----- D5 (a): Traefik down when the agent connects -----------------------------------------
@pytest.mark.timeout(60)
def test_route_appears_when_traefik_comes_up_after_the_agent(tmp_path):
    tf = Traefik(tmp_path / "traefik")  # ports chosen, not started
    gw = Gateway(tmp_path / "gw", sections={
        "hooks": {"enabled": "traefik"},  # retries back off to 30 s: the check must do it
        "hook:traefik": {"api": tf.api, "entrypoints": "web", "check_interval": "1",
                         "settle": "3", "timeout": "2"}}).start()
    backend = HttpBackend("foo")
    try:
        agent = gw.agent("foo", backend.address)
        gw.proc.wait_for(r"hook=traefik subdomain=foo connect failed", 10)
        gw.proc.wait_for(r"hook=traefik check failed", 10)
        time.sleep(2)  # Traefik stays down a while: several failed pushes and checks
        tf.start()
        up = time.monotonic()
        wait_until(lambda: routed(tf, "foo"), 15, interval=0.05, what="the route to foo")
        took = time.monotonic() - up
        print("route served %.2f s after Traefik's API answered (check_interval 1 s)" % took)
        assert took < 8, "the route came %.1f s after Traefik: not from the check" % took
        assert len(harness.TUNNEL_UP.findall(agent.stdout())) == 1, "the agent reconnected"
        assert agent.popen.poll() is None
    finally:
        backend.close()
