"""An agent that knows several gateways: it tries them in turn, and an answer about one gateway
(a server key that is not the pinned one) does not stop it while another gateway works."""

import pytest

from tests.support import harness


def two_gateways(tmp_path):
    first = harness.Gateway(tmp_path / "a").start()
    second = harness.Gateway(tmp_path / "b").start()
    assert first.key != second.key  # each made its own key
    return first, second


@pytest.mark.timeout(60)
def test_a_gateway_with_the_wrong_key_is_skipped_for_one_that_matches(tmp_path, echo_backend):
    wrong, right = two_gateways(tmp_path)
    key_file, public = right.new_key("fleet")
    wrong.grant("fleet", public)
    right.grant("fleet", public)
    argv = harness.command("diglett") + [
        "-g", "%s,%s" % (wrong.gateway, right.gateway), "-n", "fleet", "--key-file",
        str(key_file), "--server-key", right.key, "%s:%d" % echo_backend.address]
    agent = harness.Agent(argv, right.workdir, "agent-fleet")
    agent.wait_up()
    assert "%s: server key mismatch" % wrong.gateway in agent.stderr()  # tried, skipped
    with harness.connect(agent.port) as sock:
        assert harness.round_trips(sock, 3)
    assert [s["subdomain"] for s in right.sessions()] == ["fleet"]
    assert wrong.sessions() == []


@pytest.mark.timeout(60)
def test_every_gateway_with_the_wrong_key_ends_the_agent_with_exit_5(tmp_path, echo_backend):
    first, second = two_gateways(tmp_path)
    key_file, _ = first.new_key("fleet")
    other = harness.Gateway(tmp_path / "c").start()  # the key pinned belongs to neither
    argv = harness.command("diglett") + [
        "-g", "%s,%s" % (first.gateway, second.gateway), "-n", "fleet", "--key-file",
        str(key_file), "--server-key", other.key, "%s:%d" % echo_backend.address]
    agent = harness.Agent(argv, first.workdir, "agent-fleet")
    assert agent.wait(30) == 5
