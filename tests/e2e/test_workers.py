"""A diglett-server with ``workers = 2``: agents spread over the worker processes, bytes intact
through each, one /metrics summing them, same-key takeover from one worker to the other (the
Traefik route follows), a worker killed with SIGKILL comes back and its agents with it,
SIGHUP and SIGTERM reach every worker, and the master exits 0.

Every process is real (diglett-server, its workers, agents, Traefik) and on 127.0.0.1. The
master hands agent connections to the workers in turn, so agents started one after another
alternate between worker 0 and worker 1; the tests rely on that and check it.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import time
import urllib.request

import pytest

from tests.support import harness
from tests.support.fdstore_supervisor import FdStoreSupervisor
from tests.support.harness import wait_until
from tests.support.hookfixtures import HttpBackend, body_for, recorder, sha256, succeeded
from tests.support.hookfixtures import traefik  # noqa: F401 (a fixture)

EXIT_REPLACED = 7  # diglett/agent.py
SIZE = 4 << 20  # bytes each way per transfer check
GATEWAY_ID = "gw"


def start(tmp_path, **options):
    return harness.Gateway(tmp_path / "gw", workers=2, gateway_id=GATEWAY_ID, **options).start()


def metric(text, name, **labels):
    """The value of one sample of the Prometheus text ``text``; None if it is not there."""
    wanted = "%s{%s}" % (name, ",".join('%s="%s"' % kv for kv in sorted(labels.items()))) \
        if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _http_text(gw, path):
    with urllib.request.urlopen("http://%s:%d%s" % (gw.http_address + (path,)),
                                timeout=10) as answer:
        return answer.read().decode()


def worker_of(gw):
    """{subdomain: worker index} of the tunnels the master's /api/tunnels lists."""
    return {t["subdomain"]: t["worker"] for t in gw.http_get("/api/tunnels")}


def transfer(port, size=SIZE):
    """``size`` seeded bytes up, their SHA-256 and ``size`` bytes of the backend's down."""
    with harness.connect(port, timeout=30) as sock:
        harness.send_pattern(sock, size, b"up")
        sock.shutdown(socket.SHUT_WR)
        assert harness.recv_exact(sock, 32).hex() == harness.sha256_of_pattern(size, b"up")
        assert harness.recv_all(sock) == (harness.sha256_of_pattern(size, b"reply"), size)


@pytest.fixture
def digest_backend():
    backend = harness.Backend(harness.digest_then_reply(SIZE))
    yield backend
    backend.close()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(90)
def test_agents_alternate_between_workers_with_bytes_intact_and_one_metrics(
        tmp_path, digest_backend):
    gw = start(tmp_path)
    names = ["a%d" % i for i in range(4)]
    agents = {name: gw.agent(name, digest_backend.address) for name in names}
    placed = wait_until(lambda: len(worker_of(gw)) == 4 and worker_of(gw), 10,
                        what="four tunnels in /api/tunnels")
    assert placed == {"a0": 0, "a1": 1, "a2": 0, "a3": 1}
    assert {s["subdomain"]: s["gateway"] for s in gw.sessions()} == {
        "a0": "gw.w0", "a1": "gw.w1", "a2": "gw.w0", "a3": "gw.w1"}

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # all four at once
        for done in [pool.submit(transfer, agent.port) for agent in agents.values()]:
            done.result(timeout=60)

    text = _http_text(gw, "/metrics")
    assert metric(text, "diglett_agents_connected") == 4
    assert metric(text, "diglett_workers") == 2
    for index in (0, 1):
        assert metric(text, "diglett_worker_agents", worker=str(index)) == 2
        assert metric(text, "diglett_worker_up", worker=str(index)) == 1
    assert metric(text, "diglett_build_info", version=re.search(
        r'diglett_build_info\{version="([^"]+)"', text)[1]) == 1  # the same, not summed
    for name in names:
        assert metric(text, "diglett_tunnel_bytes_total", direction="in",
                      subdomain=name) >= SIZE
        assert metric(text, "diglett_tunnel_bytes_total", direction="out",
                      subdomain=name) >= SIZE
    assert metric(text, "diglett_streams_opened_total") == 4
    assert text.count("# TYPE diglett_agents_connected ") == 1
    stats = gw.http_get("/debug/stats")
    assert stats["agents"] == 4 and [w["agents"] for w in stats["workers"]] == [2, 2]
    assert gw.http_get("/healthz")["agents"] == 4
    assert gw.http_get("/info")["agent_port"] == gw.agent_address[1]

    status = json.loads(gw.admin("status", "a1", "--json").stdout)  # on worker 1
    assert status["session"]["gateway"] == "gw.w1"  # ours: not "held by gateway gw.w1"
    assert "held by gateway" not in status["session"].get("live", "")
    kicked = gw.admin("kick", "a2", "--delay", "0").stdout  # worker 0 answers the kick
    assert "kicked session" in kicked
    agents["a2"].wait_up(count=2)
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(120)
def test_same_key_takes_over_from_the_other_worker_and_the_route_follows(
        tmp_path, traefik):  # noqa: F811 (the fixture)
    sections = {"hooks": {"enabled": "traefik", "retry_max": "1"},
                "hook:traefik": {"api": traefik.api, "entrypoints": "web",
                                 "check_interval": "1", "settle": "3"}}
    gw = harness.Gateway(tmp_path / "gw", workers=2, gateway_id=GATEWAY_ID,
                         sections=sections).start()
    old_backend, new_backend = HttpBackend("old-side"), HttpBackend("new-side")
    try:
        key_file, public = gw.new_key("foo")
        gw.grant("foo", public)
        first = gw.agent("foo", old_backend.address, key_file=key_file)
        assert worker_of(gw) == {"foo": 0}

        def served():
            try:
                status, body = traefik.get("foo.example.test")
            except OSError:
                return None
            return status == 200 and sha256(body)

        wait_until(lambda: served() == sha256(body_for("old-side")), 15, interval=0.1,
                   what="Traefik routing foo to the first agent")

        second = gw.agent("foo", new_backend.address, key_file=key_file)  # to worker 1
        moved = time.monotonic()
        assert second.port == first.port  # the port moved with the name: the same route
        gw.proc.wait_for(r"worker=1 .*subdomain=foo tunnel port 127\.0\.0\.1:%d moved here "
                         r"from gateway gw\.w0" % first.port, 5)
        assert first.wait(timeout=10) == EXIT_REPLACED
        print("worker 0 gave foo up %.2f s after the new session" % (time.monotonic() - moved))
        gw.proc.wait_for(r"worker=0 .*subdomain=foo .* replaced by session [0-9a-f]+ on "
                         r"gateway gw\.w1", 5)
        wait_until(lambda: worker_of(gw) == {"foo": 1}, 5, what="foo on worker 1 only")
        assert [(s["gateway"], s["port"]) for s in gw.sessions()] == [("gw.w1", second.port)]
        wait_until(lambda: served() == sha256(body_for("new-side")), 15, interval=0.1,
                   what="Traefik routing foo to the new agent")
        print("route moved %.2f s after the new session" % (time.monotonic() - moved))
        text = _http_text(gw, "/metrics")
        assert metric(text, "diglett_hook_deliveries_total", hook="traefik") >= 3
        assert "Traceback" not in gw.proc.stderr()
    finally:
        old_backend.close()
        new_backend.close()


@pytest.mark.timeout(90)
def test_a_pinned_port_moves_between_workers_and_open_streams_finish(tmp_path):
    """Make-before-break across workers: the grant pins the port, so only moving the
    listening socket lets the new session in; a stream open on the old one runs to its end."""
    gw = start(tmp_path, drain_timeout=20)
    port = harness.free_port()
    key_file, public = gw.new_key("foo")
    gw.grant("foo", public, "--port", str(port))
    backend = harness.Backend(harness.digest_then_reply(SIZE))
    try:
        first = gw.agent("foo", backend.address, key_file=key_file)
        assert first.port == port and worker_of(gw) == {"foo": 0}
        with harness.connect(port, timeout=30) as held:  # open on worker 0's session
            harness.send_pattern(held, SIZE // 2, b"up")
            second = gw.agent("foo", backend.address, key_file=key_file)
            assert second.port == port
            wait_until(lambda: worker_of(gw) == {"foo": 1}, 10, what="foo served by worker 1")
            transfer(port)  # a new visitor: the new session, on worker 1
            gw.proc.wait_for(r"worker=0 .*subdomain=foo .* replaced by a new session of the "
                             r"same key; 1 open streams finish first", 10)
            held.sendall(harness.pattern(SIZE, b"up")[SIZE // 2:])  # the old one still works
            held.shutdown(socket.SHUT_WR)
            assert harness.recv_exact(held, 32).hex() == harness.sha256_of_pattern(SIZE, b"up")
            assert harness.recv_all(held) == (harness.sha256_of_pattern(SIZE, b"reply"), SIZE)
        assert first.wait(timeout=25) == EXIT_REPLACED
        assert [(s["gateway"], s["port"]) for s in gw.sessions()] == [("gw.w1", port)]
        transfer(port)
        assert "Traceback" not in gw.proc.stderr()
    finally:
        backend.close()


@pytest.mark.timeout(90)
def test_a_held_port_moves_with_its_visitors_to_the_worker_of_the_next_session(
        tmp_path, digest_backend):
    """The agent drops and comes back through the other worker: the port it held (and the
    visitor waiting there) goes with it, and the route never changes."""
    gw = start(tmp_path, hold_timeout=10)
    key_file, public = gw.new_key("foo")
    gw.grant("foo", public)
    first = gw.agent("foo", digest_backend.address, key_file=key_file)
    port = first.port
    first.kill()  # its connection drops: worker 0 holds the port
    gw.proc.wait_for(r"worker=0 .*subdomain=foo holding tunnel port 127\.0\.0\.1:%d" % port,
                     10)
    with harness.connect(port, timeout=30) as waiting:
        wait_until(lambda: metric(_http_text(gw, "/metrics"), "diglett_held_visitors") == 1,
                   10, what="the visitor held")
        second = gw.agent("foo", digest_backend.address, key_file=key_file)  # worker 1
        assert second.port == port
        harness.send_pattern(waiting, SIZE, b"up")
        waiting.shutdown(socket.SHUT_WR)
        assert harness.recv_exact(waiting, 32).hex() == harness.sha256_of_pattern(SIZE, b"up")
        assert harness.recv_all(waiting) == (harness.sha256_of_pattern(SIZE, b"reply"), SIZE)
    gw.proc.wait_for(r"worker=1 .*subdomain=foo tunnel port 127\.0\.0\.1:%d moved here from "
                     r"gateway gw\.w0 \(1 held visitors with it\)" % port, 5)
    assert worker_of(gw) == {"foo": 1}
    wait_until(lambda: [(s["gateway"], s["port"]) for s in gw.sessions()] == [("gw.w1", port)],
               5, what="the held session's row ended, the new one's alone")
    text = _http_text(gw, "/metrics")
    assert metric(text, "diglett_hold_visitors_total", outcome="served") == 1
    assert metric(text, "diglett_hold_visitors_total", outcome="expired") == 0
    transfer(port)
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(90)
def test_a_killed_worker_is_restarted_and_its_agent_reconnects(tmp_path, digest_backend):
    gw = start(tmp_path)
    agents = {name: gw.agent(name, digest_backend.address) for name in ("a0", "a1")}
    assert worker_of(gw) == {"a0": 0, "a1": 1}
    victim = gw.http_get("/debug/stats")["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    gw.proc.wait_for(r"worker 0 \(pid %d\) exited with signal SIGKILL: restarting it"
                     % victim, 10)
    port = agents["a0"].wait_up(timeout=30, count=2)  # the agent's next session
    wait_until(lambda: len(worker_of(gw)) == 2, 10, what="both tunnels back")
    restarted = wait_until(lambda: gw.http_get("/debug/stats")["workers"][0]["up"] and
                           gw.http_get("/debug/stats")["workers"][0], 15,
                           what="worker 0 up again")
    assert restarted["pid"] not in (None, victim)
    transfer(port)
    transfer(agents["a1"].port)  # the other worker's agent never noticed
    assert len(harness.TUNNEL_UP.findall(agents["a1"].stdout())) == 1
    sessions = gw.sessions()  # the crashed run's session was ended (stale), not left active
    assert sorted(s["subdomain"] for s in sessions) == ["a0", "a1"]
    text = _http_text(gw, "/metrics")
    assert metric(text, "diglett_worker_restarts_total", worker="0") == 1
    assert metric(text, "diglett_worker_restarts_total", worker="1") == 0
    assert metric(text, "diglett_agents_connected") == 2


@pytest.mark.timeout(90)
def test_sighup_and_sigterm_reach_every_worker_and_the_master_exits_0(
        tmp_path, digest_backend):
    gw = start(tmp_path)
    for name in ("a0", "a1"):
        gw.agent(name, digest_backend.address)
    pids = [w["pid"] for w in gw.http_get("/debug/stats")["workers"]]
    assert all(pids) and len(set(pids)) == 2

    gw.proc.signal(signal.SIGHUP)
    for index in (0, 1):
        gw.proc.wait_for(r"worker=%d .*worker %d reloaded" % (index, index), 10)

    port = gw.agents[0].port
    with harness.connect(port, timeout=30) as sock:  # a stream open across the SIGTERM
        harness.send_pattern(sock, SIZE // 2, b"up")
        gw.proc.signal(signal.SIGTERM)
        time.sleep(0.5)  # the drain has begun: the stream carries on
        sock.sendall(harness.pattern(SIZE, b"up")[SIZE // 2:])
        sock.shutdown(socket.SHUT_WR)
        assert harness.recv_exact(sock, 32).hex() == harness.sha256_of_pattern(SIZE, b"up")
        assert harness.recv_all(sock) == (harness.sha256_of_pattern(SIZE, b"reply"), SIZE)
    assert gw.proc.wait(timeout=30) == 0
    assert not [pid for pid in pids if alive(pid)], "a worker outlived the master"
    assert gw.sessions() == []  # every worker ended its sessions in the registry


@pytest.mark.timeout(90)
def test_under_an_fd_store_the_agent_port_survives_a_restart_of_the_master(
        tmp_path, digest_backend):
    """With workers the store keeps the agent port (not the workers' tunnel ports): the agent
    told SHUTTING_DOWN redials into the stored backlog and the next run serves it."""
    supervisor = FdStoreSupervisor(tmp_path)
    try:
        gw = harness.Gateway(tmp_path / "gw", supervisor=supervisor, workers=2,
                             gateway_id=GATEWAY_ID).start()
        agent = gw.agent("foo", digest_backend.address)
        wait_until(lambda: "agents" in supervisor.stored(), 5, what="the agent port stored")
        assert not [name for name in supervisor.stored() if name.startswith("door-")]
        agent_port = gw.agent_address[1]
        gw.proc.stop(30)
        assert gw.proc.popen.returncode == 0, gw.proc.stderr()[-3000:]
        gw.restart()
        assert gw.agent_address[1] == agent_port
        port = agent.wait_up(timeout=20, count=2)
        transfer(port)
        assert agent.popen.poll() is None
        assert [s["subdomain"] for s in gw.sessions()] == ["foo"]
    finally:
        supervisor.close()


@pytest.mark.timeout(90)
def test_hooks_run_once_in_the_master_for_every_worker_and_a_reload_changes_them(
        tmp_path, digest_backend):
    first_script, first_log = recorder(tmp_path, "first.py")
    second_script, second_log = recorder(tmp_path, "second.py")
    gw = start(tmp_path, sections={"hooks": {"enabled": "script", "retry_max": "1"},
                                   "hook:script": {"command": first_script, "timeout": "5"}})
    for name in ("a0", "a1"):  # one on each worker
        gw.agent(name, digest_backend.address)
    assert worker_of(gw) == {"a0": 0, "a1": 1}
    wait_until(lambda: len(succeeded(first_log)) == 2, 10, what="two connects delivered")
    time.sleep(1.5)  # more would be a second deliverer (a worker running hooks too)
    connects = sorted((e["DIGLETT_SUBDOMAIN"], e["DIGLETT_EVENT"]) for e in succeeded(first_log))
    assert connects == [("a0", "connect"), ("a1", "connect")]

    gw.config_path.write_text(gw.config_path.read_text().replace(first_script, second_script))
    gw.proc.signal(signal.SIGHUP)
    gw.proc.wait_for(r"reload: hooks now script", 10)
    gw.agent("a2", digest_backend.address)
    wait_until(lambda: [e["DIGLETT_SUBDOMAIN"] for e in succeeded(second_log)] == ["a2"], 10,
               what="the new hook delivering the next connect")
    assert len(succeeded(first_log)) == 2
    assert "Traceback" not in gw.proc.stderr()


@pytest.mark.timeout(90)
def test_a_worker_that_cannot_start_again_is_retried_while_the_other_serves(
        tmp_path, digest_backend):
    """The config broke after the start and worker 0 died: its restarts fail with one clear
    line each, backing off, worker 1 keeps serving, and fixing the file brings worker 0 back."""
    gw = start(tmp_path)
    key_file, public = gw.new_key("a0")
    gw.grant("a0", public)  # now: diglett-admin reads the file too
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "max_streams = many\n")
    os.kill(gw.http_get("/debug/stats")["workers"][0]["pid"], signal.SIGKILL)
    gw.proc.wait_for(r"worker=0 .*worker 0 cannot read its config: .*max_streams", 10)
    gw.proc.wait_for(r"worker 0 \(pid \d+\) exited with code 2: restarting it", 10)
    agent = gw.agent("a0", digest_backend.address, key_file=key_file)  # worker 1 takes it
    assert worker_of(gw) == {"a0": 1}
    transfer(agent.port)
    assert metric(_http_text(gw, "/metrics"), "diglett_worker_up", worker="0") == 0
    gw.config_path.write_text(good)
    wait_until(lambda: gw.http_get("/debug/stats")["workers"][0]["up"], 20,
               what="worker 0 back once the file is fixed")
    assert "Traceback" not in gw.proc.stderr()
