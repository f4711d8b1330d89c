"""Floods against a real server: an agent that floods PINGs or frames that move nothing is sent
GOAWAY(ENHANCE_YOUR_CALM) and closed, logged once and counted, while nobody else notices and
legitimate chatter (many tiny records, as an interactive session makes) never trips the
guard; and a handshake flood from 200 loopback source addresses (127.0.0.2-127.0.0.201; Linux
routes all of 127/8 to lo) while a legitimate agent connects (test plan C). Every load loop
is bounded in count and in time."""

import hashlib
import os
import random
import socket
import threading
import time

import pytest

from diglett import protocol, wire
from diglett.wire import ErrorCode, FrameType, RejectCode
from tests.support import harness
from tests.support.harness import Gateway, connect, wait_until
from tests.support.peers import CLOSED_EOF, CLOSED_RESET, frame, login
from tests.support.probes import (
    metric,
)

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


BUSY = wire.encode_reject(RejectCode.BUSY)
FLOOD_SECONDS = 12  # how long the flood goes on at most
FLOOD_SOURCES = ["127.0.0.%d" % n for n in range(2, 202)]  # 200 source addresses
SINGLE_SOURCE = "127.0.0.250"
SINGLE_SOURCE_CONNECTIONS = 200
AGENT_DEADLINE = 10.0  # seconds the plan gives the late agent (several tries with backoff)
LATE_AGENTS = 6  # legitimate agents that start during the flood: every one must get in


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Flood:
    """One thread per source address, each bounded by ``stop`` and FLOOD_SECONDS: silent
    connections, preamble + 10 bytes then silence, or random act ones in a loop."""

    def __init__(self, address, sources):
        self.address = address
        self.stop = threading.Event()
        self.counts = {"connections": 0, "busy": 0, "closed": 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(source, number % 3), daemon=True)
                        for number, source in enumerate(sources)]

    def start(self):
        self.deadline = time.monotonic() + FLOOD_SECONDS
        for thread in self.threads:
            thread.start()

    def _count(self, key):
        with self.lock:
            self.counts[key] += 1

    def _run(self, source, mode):
        rng = random.Random(source)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                sock = socket.create_connection(self.address, timeout=5,
                                                source_address=(source, 0))
            except OSError:
                time.sleep(0.1)
                continue
            self._count("connections")
            try:
                if mode == 1:
                    sock.sendall(wire.encode_preamble() + rng.randbytes(10))
                elif mode == 2:
                    sock.sendall(wire.encode_preamble() + b"\x00" + rng.randbytes(49))
                sock.settimeout(max(0.1, self.deadline - time.monotonic()))
                answer = sock.recv(64)
                if answer == BUSY:
                    self._count("busy")
                    time.sleep(0.05)
                else:
                    self._count("closed")
            except OSError:
                pass
            finally:
                sock.close()

    def join(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_legitimate_agent_connects_during_a_handshake_flood_from_200_sources(tmp_path,
                                                                            echo_backend):
    gateway = Gateway(tmp_path / "gw", handshake_timeout=2, penalty_max=10,
                      max_startups="16:30:64", per_source_startups=8).start()
    live = gateway.agent("live", echo_backend.address)
    late_keys = {}
    for number in range(LATE_AGENTS):
        name = "late%d" % number
        late_keys[name], public = gateway.new_key(name)
        gateway.grant(name, public)

    samples, failures, pending = [], [], []
    stop = threading.Event()

    def ping_pong():
        with connect(live.port, timeout=10) as sock:
            number = 0
            while not stop.is_set():
                try:
                    samples.extend(harness.round_trips(sock, 1))
                except (OSError, AssertionError) as exc:
                    failures.append(repr(exc))
                    return
                number += 1
                time.sleep(0.02)

    def watch_pending():
        while not stop.is_set():
            try:
                pending.append(gateway.http_get("/debug/stats")["pending_handshakes"])
            except OSError:
                pass
            time.sleep(0.1)

    helpers = [threading.Thread(target=ping_pong, daemon=True),
               threading.Thread(target=watch_pending, daemon=True)]
    for thread in helpers:
        thread.start()
    flood = Flood(gateway.agent_address, FLOOD_SOURCES)
    flood.start()
    single = []
    try:
        # 200 connections from one address, at once: at most per_source_startups get a slot.
        for _ in range(SINGLE_SOURCE_CONNECTIONS):
            try:
                single.append(socket.create_connection(gateway.agent_address, timeout=5,
                                                       source_address=(SINGLE_SOURCE, 0)))
            except OSError:
                pass
        time.sleep(1.0)  # the flood fills every pre-auth slot it can
        answers = []
        for sock in single:
            sock.settimeout(0.05)
            try:
                answers.append(sock.recv(64))
            except socket.timeout:
                answers.append(None)  # admitted: the server waits for our handshake
            except OSError:
                answers.append(b"")
        admitted = answers.count(None)
        print("single source: %d of %d connections admitted, %d refused BUSY"
              % (admitted, len(single), answers.count(BUSY)))
        assert admitted <= 8, "one source held %d handshake slots" % admitted

        started = time.monotonic()
        late = {name: gateway.agent(name, echo_backend.address, key_file=key, wait=False)
                for name, key in late_keys.items()}
        up, missing = {}, {}
        for name, agent in late.items():
            try:
                agent.wait_up(timeout=max(0.1, AGENT_DEADLINE - (time.monotonic() - started)))
                up[name] = time.monotonic() - started
            except AssertionError:
                missing[name] = agent.stderr().count("BUSY")
        print("late agents during the flood: up after %s; not up within %.0f s (BUSY refusals): "
              "%s; flood so far: %s" % ({n: round(t, 2) for n, t in up.items()}, AGENT_DEADLINE,
                                        missing, flood.counts))
        assert not missing, "%d of %d legitimate agents were not up within %.0f s: %s" % (
            len(missing), LATE_AGENTS, AGENT_DEADLINE, missing)
        for agent in late.values():
            with connect(agent.port, timeout=5) as sock:
                harness.round_trips(sock, 3)
    finally:
        flood.join()
        for sock in single:
            sock.close()
        stop.set()
        for thread in helpers:
            thread.join(10)
    assert not failures, "the connected agent's ping-pong failed: %s" % failures
    assert len(samples) > 50
    print("connected agent during the flood: %d round trips, p99 %.1f ms, max %.1f ms; pending "
          "handshakes max %d" % (len(samples), percentile(samples, 0.99) * 1e3,
                                 max(samples) * 1e3, max(pending)))
    assert max(samples) < 2.0, "a round trip stalled %.1f s during the flood" % max(samples)
    assert pending and max(pending) <= 64, "pending handshakes went past max_startups full"
    assert flood.counts["connections"] >= 200, flood.counts
    assert gateway.http_get("/debug/stats")["agents"] == 1 + LATE_AGENTS
    assert "Traceback" not in gateway.proc.stderr()
    wait_until(lambda: gateway.http_get("/debug/stats")["pending_handshakes"] == 0, 5,
               what="the pending handshakes to drain")
