"""Doors in one process: make-before-break takeover and the hold of a name's tunnel port.

What users rely on: a reconnecting agent's visitors wait instead of being refused, and are
served by the next session; a newer connection of the same key takes new visitors at once
while the old one's open streams finish; a revoke or a kick never holds.
"""

import hashlib
import os

import gevent
import gevent.server
import pytest
from gevent import socket

from diglett import agent as agent_module
from diglett import config, crypto
from diglett.reasons import CloseReason
from diglett.registry import Registry
from diglett.server import Server

pytestmark = pytest.mark.timeout(30)

HOLD = 3.0  # seconds a port holds in these tests


def make_gateway(tmp_path, **options):
    settings = {"listen": "127.0.0.1:0", "http": "127.0.0.1:0", "key": tmp_path / "server.key",
                "database": tmp_path / "registry.db", "domain": "example.test",
                "ping_interval": 1, "dead_after": 3, "handshake_timeout": 3, "penalty_max": 0,
                "shutdown_timeout": 2, "drain_timeout": 5, "hold_timeout": HOLD, **options}
    path = tmp_path / "diglett.conf"
    path.write_text("[server]\n" + "".join("%s = %s\n" % item for item in settings.items()))
    server = Server(config.load_server(path), Registry(str(tmp_path / "registry.db")))
    server.start()
    return server


@pytest.fixture
def gateway(tmp_path):
    server = make_gateway(tmp_path)
    yield server
    server.stop()
    server.registry.close()


def backend(tag):
    """A backend that answers each connection with ``tag`` then echoes: who served it."""
    def handle(sock, _address):
        sock.sendall(tag)
        while data := sock.recv(65536):
            sock.sendall(data)
    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server


@pytest.fixture
def backends():
    started = {tag: backend(tag) for tag in (b"A", b"B")}
    yield {tag: server.address for tag, server in started.items()}
    for server in started.values():
        server.stop()


def agent(server, address, key, name="foo"):
    server.registry.grant(name, crypto.public_hex(key))
    tunnel_agent = agent_module.Agent(("127.0.0.1", server.agent_port), name, key,
                                      server.public_key, address, out=open(os.devnull, "w"))
    return tunnel_agent, gevent.spawn(tunnel_agent.run)


def wait(predicate, what, timeout=10):
    with gevent.Timeout(timeout, AssertionError("timed out waiting for " + what)):
        while not predicate():
            gevent.sleep(0.01)


def serving(server, name="foo"):
    session = server.sessions.get(name)
    return session if session is not None and session.recorded else None


def visit(port):
    """A visitor: (its socket, the tag of the backend that served it)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client, client.recv(1)


def echo_intact(client, size=256 * 1024):
    data = os.urandom(size)
    sender = gevent.spawn(client.sendall, data)
    received = bytearray()
    while len(received) < size:
        chunk = client.recv(65536)
        assert chunk, "closed after %d bytes" % len(received)
        received += chunk
    sender.get()
    return hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def active_ids(server):
    return {row.id for row in server.registry.active_sessions()}


def test_a_new_connection_of_the_key_takes_new_visitors_while_old_streams_finish(
        gateway, backends):
    key = crypto.generate_private_key()
    first, first_run = agent(gateway, backends[b"A"], key)
    wait(lambda: serving(gateway), "the first session")
    old = serving(gateway)
    long_lived, tag = visit(old.port)
    assert tag == b"A" and echo_intact(long_lived)

    second, second_run = agent(gateway, backends[b"B"], key)
    wait(lambda: serving(gateway) not in (None, old), "the new session")
    new = serving(gateway)
    assert new.port == old.port  # the same door
    fresh, tag = visit(new.port)
    assert tag == b"B"  # new visitors go to the new session at once
    assert echo_intact(long_lived)  # the old stream still flows, after the takeover
    assert old.tunnel.close_reason is None and old in gateway.draining
    wait(lambda: active_ids(gateway) == {new.session_id}, "the old row ended")
    long_lived.close()
    assert first_run.get(timeout=10) == agent_module.EXIT_REPLACED
    assert old.tunnel.close_reason is CloseReason.REPLACED and not gateway.draining
    assert echo_intact(fresh)
    fresh.close()
    second.stop()
    second_run.get(timeout=5)


def test_visitors_wait_while_the_agent_reconnects_and_the_route_stays(gateway, backends):
    key = crypto.generate_private_key()
    first, first_run = agent(gateway, backends[b"A"], key)
    wait(lambda: serving(gateway), "the first session")
    old = serving(gateway)
    first.stop()
    assert first_run.get(timeout=5) == agent_module.EXIT_OK
    wait(lambda: gateway.sessions.get("foo") is None, "the session to leave")
    assert active_ids(gateway) == {old.session_id}  # still published during the hold
    waiting = socket.create_connection(("127.0.0.1", old.port), timeout=10)
    wait(lambda: gateway.doors["foo"].waiting() == 1, "the visitor to be held")

    second, second_run = agent(gateway, backends[b"B"], key)
    assert waiting.recv(1) == b"B"  # served by the next session
    assert echo_intact(waiting)
    wait(lambda: serving(gateway), "the next session's row")  # committed on the db thread
    new = serving(gateway)
    assert new.port == old.port
    wait(lambda: active_ids(gateway) == {new.session_id}, "the held row to end")
    assert gateway.hold_counters.resumed == 1 and gateway.hold_counters.served == 1
    waiting.close()
    second.stop()
    second_run.get(timeout=5)


def test_a_hold_with_no_agent_back_resets_visitors_and_closes_the_port(gateway, backends):
    first, first_run = agent(gateway, backends[b"A"], crypto.generate_private_key())
    wait(lambda: serving(gateway), "the session")
    port = serving(gateway).port
    first.stop()
    first_run.get(timeout=5)
    waiting = socket.create_connection(("127.0.0.1", port), timeout=HOLD + 5)
    started = gevent.get_hub().loop.now()
    with pytest.raises(ConnectionResetError):
        waiting.recv(1)
    assert gevent.get_hub().loop.now() - started >= HOLD - 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert "foo" not in gateway.doors and gateway.hold_counters.expired == 1
    wait(lambda: not active_ids(gateway), "the held session's row to end")  # written async


def test_a_revoked_name_is_not_held(gateway, backends):
    first, first_run = agent(gateway, backends[b"A"], crypto.generate_private_key())
    wait(lambda: serving(gateway), "the session")
    port = serving(gateway).port
    gateway.registry.revoke("foo")
    assert first_run.get(timeout=10) == agent_module.EXIT_REVOKED
    wait(lambda: "foo" not in gateway.doors, "the door to close")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert gateway.hold_counters.holds == 0
    wait(lambda: not active_ids(gateway), "the row to end")


def test_visitors_beyond_hold_max_visitors_are_reset(tmp_path, backends):
    server = make_gateway(tmp_path, hold_max_visitors=2)
    try:
        first, first_run = agent(server, backends[b"A"], crypto.generate_private_key())
        wait(lambda: serving(server), "the session")
        port = serving(server).port
        first.stop()
        first_run.get(timeout=5)
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        wait(lambda: server.hold_counters.overflow == 1, "the third visitor to be reset")
        assert server.doors["foo"].waiting() == 2
        for sock in held:
            sock.close()
    finally:
        server.stop()
        server.registry.close()


def test_a_stopping_agent_finishes_its_streams_while_new_visitors_wait(gateway, backends):
    key = crypto.generate_private_key()
    first, first_run = agent(gateway, backends[b"A"], key)
    wait(lambda: serving(gateway), "the first session")
    port = serving(gateway).port
    open_stream, tag = visit(port)
    assert tag == b"A"
    first.stop()  # SIGTERM: GOAWAY NO_ERROR, the open stream may finish
    wait(lambda: not gateway.sessions["foo"].accepting, "the server to take the GOAWAY")
    newcomer = socket.create_connection(("127.0.0.1", port), timeout=10)
    wait(lambda: gateway.doors["foo"].waiting() == 1, "the newcomer to be held")
    assert echo_intact(open_stream)  # still flowing through the stopping agent
    open_stream.close()
    assert first_run.get(timeout=10) == agent_module.EXIT_OK
    second, second_run = agent(gateway, backends[b"B"], key)
    assert newcomer.recv(1) == b"B" and echo_intact(newcomer)
    newcomer.close()
    second.stop()
    second_run.get(timeout=10)
