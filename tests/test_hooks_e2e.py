"""End-to-end hooks with real processes: Traefik routes that follow the agents (also across a
kill -9 of the server and a restart of Traefik), webhook deliveries that survive a receiver
outage and server restarts, script hooks that fail, hang or flood, and graceful shutdown.

Each test runs a real diglett-server (tests.harness.Gateway with hook sections), real agents,
and the real Traefik binary or a real HTTP receiver or real scripts (tests.hookfixtures).
Where the hooks issue names a time users should see, the test allows slack and prints the
measured figure.
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

from tests import harness, hookfixtures
from tests.harness import Backend, Gateway, connect, echo, wait_until
from tests.hookfixtures import (HttpBackend, Receiver, body_for, pids_with, read_log, recorder,
                                sha256, succeeded, traefik, wait_gone, write_script)

assert traefik  # a fixture

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


def routed(tf, name):
    """True when Traefik serves ``name``'s backend body (checked by hash)."""
    try:
        status, body = tf.get("%s.example.test" % name)
    except OSError:
        return False
    return status == 200 and sha256(body) == sha256(body_for(name))


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
