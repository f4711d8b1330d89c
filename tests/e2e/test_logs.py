"""Log lines: key=value text by default, JSON objects with the same pairs on request."""

import json

import pytest

from tests.support import harness


@pytest.mark.timeout(40)
def test_json_log_format_gives_one_object_per_line_with_fields(tmp_path, echo_backend):
    gateway = harness.Gateway(tmp_path / "gw", log_format="json")
    proc = harness.Proc(harness.command("diglett-server") + ["-c", str(gateway.config_path)],
                        gateway.workdir, "server")
    gateway.proc = proc
    ready = harness.wait_until(lambda: [json.loads(line) for line in proc.stderr().splitlines()
                                        if "ready: agents=" in line], 15, what="ready line")
    entry = ready[0]
    assert entry["level"] == "info" and entry["logger"] == "diglett.cli.server"
    host, port = entry["agents"].rsplit(":", 1)
    gateway.agent_address, gateway.key = (host, int(port)), entry["key"]
    gateway.agent("jsonlog", echo_backend.address)
    lines = [json.loads(line) for line in proc.stderr().splitlines() if line.strip()]
    connected = [e for e in lines if "connected from" in e["message"]]
    assert connected and connected[0]["subdomain"] == "jsonlog"
    assert connected[0]["session"] and connected[0]["agent"]


@pytest.mark.timeout(40)
def test_text_log_lines_carry_key_value_pairs(gateway, echo_backend):
    gateway.agent("textlog", echo_backend.address)
    line = gateway.proc.wait_for(r".* INFO diglett\.gateway\.agent_session: subdomain=textlog "
                                 r"agent=[0-9a-f]{16} "
                                 r"session=[0-9a-f]{16} connected from .*", 10)
    assert line
