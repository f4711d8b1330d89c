"""The gateway's objects in one process: the authorize decision alone, then a real Server,
a real SQLite registry and the real Agent under gevent, without subprocesses, so a change
above the sans-IO layer is checked in seconds."""

import hashlib
import os
import types

import gevent
import gevent.server
import pytest
from gevent import socket

from diglett import agent as agent_module
from diglett import config, crypto, wire
from diglett.gateway import authorize
from diglett.gateway.limits import MemoryBudget
from diglett.gateway.ports import TunnelPorts
from diglett.reasons import CloseReason
from diglett.registry import Grant, Registry
from diglett.server import Server
from diglett.wire import ErrorCode

pytestmark = pytest.mark.timeout(30)

KEY = "02" + "11" * 32
OTHER = "03" + "22" * 32


def grant(name="foo", key=KEY, port=None):
    return Grant(subdomain=name, key=key, port=port, comment="", created=0.0)


def live(key):
    return types.SimpleNamespace(key=key)


def row(name, key, gateway="gw2"):
    return types.SimpleNamespace(subdomain=name, key=key, gateway=gateway)


# ----- the pure decision -------------------------------------------------------------------
def test_a_granted_key_gets_its_grant():
    grants = {("foo", KEY): grant()}
    assert authorize.authorize({"subdomain": "FOO"}, KEY, grants, {}) == grant()


@pytest.mark.parametrize("request_, code", [
    ({"subdomain": "a.b"}, ErrorCode.INVALID_NAME),
    ({"subdomain": 7}, ErrorCode.INVALID_NAME),
    ({}, ErrorCode.INVALID_NAME),
    ({"subdomain": "bar"}, ErrorCode.UNAUTHORIZED),
])
def test_a_bad_or_ungranted_name_is_refused_with_its_code(request_, code):
    decision = authorize.authorize(request_, KEY, {("foo", KEY): grant()}, {})
    assert isinstance(decision, authorize.Refusal) and decision.code == code
    assert decision.penalty > 0  # both count toward admission penalties


def test_unreadable_grants_fail_closed_and_stopping_refuses_first():
    decision = authorize.authorize({"subdomain": "foo"}, KEY, None, {})
    assert decision.code == ErrorCode.RESOURCE_SHORTAGE
    decision = authorize.authorize({"subdomain": "a.b"}, KEY, None, {}, stopping=True)
    assert decision.code == ErrorCode.SHUTTING_DOWN


def test_another_key_holding_the_name_here_or_elsewhere_is_name_in_use():
    grants = {("foo", KEY): grant(), ("foo", OTHER): grant(key=OTHER)}
    here = authorize.authorize({"subdomain": "foo"}, KEY, grants, {"foo": live(OTHER)})
    assert here.code == ErrorCode.NAME_IN_USE
    there = authorize.authorize({"subdomain": "foo"}, KEY, grants, {},
                                elsewhere=[row("foo", OTHER)])
    assert there.code == ErrorCode.NAME_IN_USE and "gw2" in there.reason


def test_the_same_key_may_replace_its_own_session_here_or_move_from_elsewhere():
    grants = {("foo", KEY): grant()}
    assert authorize.authorize({"subdomain": "foo"}, KEY, grants, {"foo": live(KEY)},
                               elsewhere=[row("foo", KEY)]) == grant()


def test_an_ungranted_key_learns_nothing_about_who_holds_the_name():
    decision = authorize.authorize({"subdomain": "foo"}, OTHER, {("foo", KEY): grant()},
                                   {"foo": live(KEY)})
    assert decision.code == ErrorCode.UNAUTHORIZED


# ----- small parts -------------------------------------------------------------------------
def test_the_memory_budget_refuses_above_three_quarters_until_below_half():
    budget = MemoryBudget()
    assert [budget.exceeded(b, 100) for b in (70, 80, 60, 51, 49, 70)] == [
        False, True, True, True, False, False]


def test_tunnel_ports_give_a_name_its_last_port_back_and_honour_a_pin():
    ports = TunnelPorts(types.SimpleNamespace(bind="127.0.0.1", ports=None))
    first = ports.bind("foo", grant())
    port = first.getsockname()[1]
    first.close()
    ports.remember("foo", port)
    again = ports.bind("foo", grant())
    assert again.getsockname()[1] == port
    with pytest.raises(OSError):
        ports.bind("bar", grant(name="bar", port=port))  # pinned to a port in use
    again.close()


def test_a_full_port_range_is_an_error_naming_it():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    ports = TunnelPorts(types.SimpleNamespace(bind="127.0.0.1", ports=(port, port)))
    with pytest.raises(OSError, match="no free port in %d-%d" % (port, port)):
        ports.bind("foo", grant())
    taken.close()


# ----- a Server, a registry and agents in this process -------------------------------------
@pytest.fixture
def gateway(tmp_path):
    path = tmp_path / "diglett.conf"
    path.write_text("[server]\nlisten = 127.0.0.1:0\nhttp = 127.0.0.1:0\nkey = %s\n"
                    "database = %s\ndomain = example.test\nping_interval = 1\n"
                    "dead_after = 3\nhandshake_timeout = 3\npenalty_max = 0\n"
                    "shutdown_timeout = 2\ndrain_timeout = 1\nhold_timeout = 0\n"
                    % (tmp_path / "server.key", tmp_path / "registry.db"))
    registry = Registry(str(tmp_path / "registry.db"))
    server = Server(config.load_server(path), registry)
    server.start()
    yield server
    server.stop()
    registry.close()


@pytest.fixture
def echo():
    def handle(sock, _address):
        while data := sock.recv(65536):
            sock.sendall(data)
    backend = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    backend.start()
    yield backend.address
    backend.stop()


def start_agent(server, backend, name="foo", key=None):
    key = key or crypto.generate_private_key()
    server.registry.grant(name, crypto.public_hex(key))
    tunnel_agent = agent_module.Agent(("127.0.0.1", server.agent_port), name, key,
                                      server.public_key, backend, out=open(os.devnull, "w"))
    greenlet = gevent.spawn(tunnel_agent.run)
    wait(lambda: name in server.sessions and server.sessions[name].recorded, "session up")
    return tunnel_agent, greenlet, key


def wait(predicate, what, timeout=10):
    with gevent.Timeout(timeout, AssertionError("timed out waiting for " + what)):
        while not predicate():
            gevent.sleep(0.01)


def round_trip(port, size=1 << 20):
    data = os.urandom(size)
    client = socket.create_connection(("127.0.0.1", port))
    sender = gevent.spawn(client.sendall, data)
    received = bytearray()
    while len(received) < size:
        chunk = client.recv(65536)
        assert chunk, "closed after %d bytes" % len(received)
        received += chunk
    sender.get()
    client.close()
    return hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


def test_bytes_cross_an_in_process_tunnel_intact_and_show_in_the_snapshot(gateway, echo):
    tunnel_agent, greenlet, _ = start_agent(gateway, echo)
    session = gateway.sessions["foo"]
    assert round_trip(session.port)
    snapshot = gateway.snapshots()["foo"]
    assert snapshot.public_host == "foo.example.test"
    assert snapshot.bytes_in == snapshot.bytes_out == 1 << 20
    assert snapshot.streams_opened == 1
    tunnel_agent.stop()
    assert greenlet.get(timeout=5) == agent_module.EXIT_OK
    wait(lambda: not gateway.registry.active_sessions(), "the session row ended")
    ended = gateway.registry.last_port("foo")
    assert ended == session.port


def test_a_revoked_grant_ends_the_session_with_reason_revoked(gateway, echo):
    tunnel_agent, greenlet, key = start_agent(gateway, echo)
    session = gateway.sessions["foo"]
    gateway.registry.revoke("foo")
    assert greenlet.get(timeout=10) == agent_module.EXIT_REVOKED
    assert session.tunnel.close_reason is CloseReason.REVOKED


def test_the_same_key_takes_its_name_over_and_the_old_session_ends_replaced(gateway, echo):
    key = crypto.generate_private_key()
    first, first_greenlet, _ = start_agent(gateway, echo, key=key)
    old = gateway.sessions["foo"]
    second, second_greenlet, _ = start_agent(gateway, echo, key=key)
    wait(lambda: gateway.sessions.get("foo") not in (None, old), "the new session")
    assert old.tunnel.close_reason is CloseReason.REPLACED
    assert first_greenlet.get(timeout=10) == agent_module.EXIT_REPLACED
    assert round_trip(gateway.sessions["foo"].port, 4096)
    second.stop()
    second_greenlet.get(timeout=5)


def test_junk_instead_of_a_handshake_is_counted_and_the_gateway_serves_on(gateway, echo):
    junk = socket.create_connection(("127.0.0.1", gateway.agent_port))
    junk.sendall(wire.encode_preamble() + b"\x00" + b"\xff" * 49)
    assert junk.recv(100) == b""  # closed by the gateway
    wait(lambda: gateway.handshake_failures.get("act1 bad key") == 1, "the failure counted")
    tunnel_agent, greenlet, _ = start_agent(gateway, echo)
    assert round_trip(gateway.sessions["foo"].port, 4096)
    tunnel_agent.stop()
    greenlet.get(timeout=5)
