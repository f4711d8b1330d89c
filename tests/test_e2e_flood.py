"""Flood guards on a real server: an agent that floods PINGs or frames that move nothing is
sent GOAWAY(ENHANCE_YOUR_CALM) and closed, logged once and counted; nobody else notices, and
legitimate chatter (many tiny records, as an interactive session makes) never trips them."""

import hashlib
import os

import pytest

from diglett import protocol, wire
from diglett.wire import ErrorCode, FrameType
from tests import harness
from tests.plan_peer import CLOSED_EOF, CLOSED_RESET, frame, login
from tests.test_e2e_limits import metric

LIMITS = {"ping_limit": 50, "flood_limit": 200}  # shrunk so a test floods in milliseconds


@pytest.fixture
def guarded(tmp_path, echo_backend):
    gateway = harness.Gateway(tmp_path / "gw", **LIMITS).start()
    bystander = gateway.agent("bystander", echo_backend.address)
    return gateway, bystander


def hostile(gateway, name="noisy"):
    key_file, public = gateway.new_key(name)
    gateway.grant(name, public)
    agent, answer = login(gateway, key_file, name)
    assert isinstance(answer, protocol.Accepted), answer
    return agent


def assert_calmed(gateway, agent, what):
    state, _ = agent.until_closed(10)
    assert state in (CLOSED_EOF, CLOSED_RESET)
    assert [g.code for g in agent.goaways()] == [ErrorCode.ENHANCE_YOUR_CALM]
    harness.wait_until(lambda: metric(gateway, "diglett_flood_closes") == 1, 5,
                       what="diglett_flood_closes to count the session")
    log = gateway.proc.stderr()
    warnings = [line for line in log.splitlines() if " WARNING " in line and what in line]
    assert len(warnings) == 1, log[-2000:]  # one line per limit hit (the session's end aside)


def assert_bystander_unharmed(bystander):
    data = os.urandom(256 * 1024)
    with harness.connect(bystander.port) as sock:
        sock.sendall(data)
        assert hashlib.sha256(harness.recv_exact(sock, len(data))).digest() == \
            hashlib.sha256(data).digest()


@pytest.mark.timeout(30)
def test_a_ping_flood_ends_only_the_flooding_session(guarded):
    gateway, bystander = guarded
    agent = hostile(gateway)
    agent.send_frames(*[frame(FrameType.PING, 0, i.to_bytes(8, "big")) for i in range(60)])
    assert_calmed(gateway, agent, "flood: more than 50 PINGs in a minute")
    assert_bystander_unharmed(bystander)


@pytest.mark.timeout(30)
def test_frames_for_a_closed_stream_flood_ends_the_session(guarded):
    gateway, bystander = guarded
    agent = hostile(gateway)
    client = harness.connect(agent_port(gateway, "noisy"))
    opened = agent.wait_for(lambda e: isinstance(e, protocol.StreamOpened), 10)
    sid = opened.stream_id
    agent.send_frames(frame(FrameType.RESET, sid, wire.encode_u16(ErrorCode.CONNECT_FAILED)))
    late = frame(FrameType.WINDOW, sid, wire.encode_u32(1))
    for _ in range(3):  # 300 frames that move nothing, in three records
        agent.send_frames(*[late] * 100)
    assert_calmed(gateway, agent, "flood: more than 200 frames that move no stream forward")
    client.close()
    assert_bystander_unharmed(bystander)


@pytest.mark.timeout(60)
def test_interactive_chatter_never_trips_the_guards(guarded):
    """2000 one-byte round trips (a typing session's records) and a few hundred streams that
    open and close at once: all within the shrunk limits' reach, none of it flood."""
    gateway, bystander = guarded
    with harness.connect(bystander.port) as sock:
        for index in range(2000):
            byte = bytes([index % 256])
            sock.sendall(byte)
            assert sock.recv(1) == byte
    socks = [harness.connect(bystander.port) for _ in range(300)]
    for sock in socks:
        sock.sendall(b"x")
    for sock in socks:
        assert sock.recv(1) == b"x"
        sock.close()
    assert_bystander_unharmed(bystander)
    assert metric(gateway, "diglett_flood_closes") == 0
    assert "flood" not in gateway.proc.stderr()


def agent_port(gateway, name):
    return next(s["port"] for s in gateway.sessions() if s["subdomain"] == name)
