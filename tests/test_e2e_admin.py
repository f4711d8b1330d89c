"""diglett-admin against a running server: status explains a name, kick ends its session,
the audit trail records both."""

import json
import time

import pytest

from tests import harness
from tests.hookfixtures import HttpBackend, recorder, traefik  # noqa: F401 (fixture)


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
