"""A server restart under an fd store (systemd's; here tests.fdstore_supervisor, which
speaks the same sd_notify / LISTEN_FDS protocol): the agent port and the tunnel ports stay
open across it, a visitor who connects in the gap waits in the backlog and is served by the
next run, and the session is handed on without a disconnect in between.

Real server and agent processes on 127.0.0.1; every wait has a deadline.
"""

import hashlib
import os
import time

import pytest

from tests.support import harness
from tests.support.fdstore_supervisor import FdStoreSupervisor
from tests.support.harness import Gateway, connect, recv_exact, wait_until
from tests.support.hookfixtures import recorder, succeeded
from tests.support.reachfixtures import LISTENING, reach_gateway, start_agent


def supervised(tmp_path, hold_timeout):
    command, log = recorder(tmp_path)
    supervisor = FdStoreSupervisor(tmp_path)
    gw = Gateway(tmp_path / "gw", supervisor=supervisor, hold_timeout=hold_timeout,
                 sections={"hooks": {"enabled": "script", "retry_max": "1"},
                           "hook:script": {"command": command, "timeout": "5"}})
    return supervisor, gw.start(), log


def events_of(log, name="foo"):
    return [(e["DIGLETT_EVENT"], e["DIGLETT_REASON"], e["DIGLETT_SESSION"])
            for e in succeeded(log) if e["DIGLETT_SUBDOMAIN"] == name]


@pytest.mark.timeout(90)
def test_restart_keeps_the_ports_and_serves_a_visitor_who_came_in_the_gap(
        tmp_path, echo_backend):
    supervisor, gw, log = supervised(tmp_path, hold_timeout=10)
    try:
        agent = gw.agent("foo", echo_backend.address)
        port = agent.port
        with connect(port, timeout=5) as sock:
            sock.sendall(b"before")
            assert recv_exact(sock, 6) == b"before"
        wait_until(lambda: ("agents" in supervisor.stored() and "door-foo" in supervisor.stored()),
                   5, what="the agent port and foo's port in the fd store")
        old = gw.sessions()[0]["id"]
        wait_until(lambda: len(events_of(log)) == 1, 10, what="the connect hook")

        gw.proc.stop(30)  # SIGTERM: the ports stay open in the store
        assert gw.proc.popen.returncode == 0, gw.proc.stderr()[-3000:]
        payload = os.urandom(256 * 1024)
        visitor = connect(port, timeout=20)  # the kernel accepts into the stored backlog
        visitor.sendall(payload)
        restarted = time.monotonic()
        gw.restart()
        echoed = recv_exact(visitor, len(payload))
        waited = time.monotonic() - restarted
        visitor.close()
        print("the visitor of the gap was served %.2f s after the new run started" % waited)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

        assert agent.popen.poll() is None, agent.stderr()[-2000:]
        rows = wait_until(lambda: [r for r in gw.sessions() if r["id"] != old], 10,
                          what="the agent's new session")
        assert rows[0]["port"] == port
        assert "came through the restart (fd store)" in gw.proc.stderr()
        assert "reason=stale" not in gw.proc.stderr()
        # The route never went: the new session's connect comes before the old one's end.
        wait_until(lambda: len(events_of(log)) == 3, 10, what="three hook runs")
        assert events_of(log) == [("connect", "", old), ("connect", "", rows[0]["id"]),
                                  ("disconnect", "shutdown", old)], events_of(log)
    finally:
        supervisor.close()


@pytest.mark.timeout(60)
def test_a_stored_port_whose_agent_does_not_come_back_closes_when_the_hold_ends(
        tmp_path, echo_backend):
    supervisor, gw, log = supervised(tmp_path, hold_timeout=2)
    try:
        agent = gw.agent("foo", echo_backend.address)
        port = agent.port
        old = gw.sessions()[0]["id"]
        gw.proc.stop(30)
        agent.kill()  # it will not reconnect
        visitor = connect(port, timeout=5)
        gw.restart()
        visitor.settimeout(10)
        with pytest.raises(ConnectionResetError):  # reset when the hold is over, not left
            visitor.recv(1)
        visitor.close()
        wait_until(lambda: harness.port_closed(port), 5, what="foo's port to close")
        wait_until(lambda: "door-foo" not in supervisor.stored(), 5,
                   what="foo's port to leave the fd store")
        assert "agents" in supervisor.stored()
        wait_until(lambda: events_of(log)[-1:] == [("disconnect", "shutdown", old)], 10,
                   what="the old session's disconnect")
        assert gw.sessions() == []
    finally:
        supervisor.close()


@pytest.mark.timeout(60)
def test_without_hold_the_passed_ports_close_and_the_old_sessions_end(tmp_path, echo_backend):
    supervisor, gw, log = supervised(tmp_path, hold_timeout=0)
    try:
        agent = gw.agent("foo", echo_backend.address)
        old = gw.sessions()[0]["id"]
        gw.restart(graceful=True)
        wait_until(lambda: ("disconnect", "shutdown", old) in events_of(log), 10,
                   what="the old session's disconnect")
        agent.wait_up(timeout=15, count=2)  # served again, on a port of the new run
        assert "reason=stale" not in gw.proc.stderr()
    finally:
        supervisor.close()


@pytest.mark.timeout(90)
def test_the_tls_and_websocket_listeners_stay_open_across_a_restart(tmp_path, echo_backend):
    supervisor = FdStoreSupervisor(tmp_path)
    try:
        gw = reach_gateway(tmp_path / "gw", supervisor=supervisor)
        wait_until(lambda: {"agents", "agents-tls", "agents-ws"} <= set(supervisor.stored()), 5,
                   what="both transport listeners in the fd store")
        agents = {name: start_agent(gw, name, url, echo_backend.address,
                                    extra=["--proxy", "none"])
                  for name, url in (("overtls", "tls://127.0.0.1:%d" % gw.tls_port),
                                    ("overws", "ws://127.0.0.1:%d/diglett" % gw.ws_port))}
        old = {row["id"] for row in gw.sessions()}

        gw.proc.stop(30)  # SIGTERM under the store
        for port in (gw.tls_port, gw.ws_port):  # refused without the store; here, the backlog
            connect(port, timeout=5).close()
        gw.restart()
        for kind, port in (("tls", gw.tls_port), ("ws", gw.ws_port)):
            assert int(gw.proc.wait_for(LISTENING % kind).group(1)) == port

        def new_sessions():
            rows = [r for r in gw.sessions() if r["id"] not in old]
            return rows if len(rows) == 2 else None

        rows = wait_until(new_sessions, 20, what="both agents' new sessions")
        assert {r["subdomain"] for r in rows} == set(agents)
        for name, agent in agents.items():
            assert agent.popen.poll() is None, agent.stderr()[-2000:]
            payload = os.urandom(64 * 1024)
            with connect(agent.port, timeout=10) as sock:
                sock.sendall(payload)
                assert hashlib.sha256(recv_exact(sock, len(payload))).digest() == \
                    hashlib.sha256(payload).digest(), name
    finally:
        supervisor.close()
