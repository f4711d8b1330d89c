"""Test plan C (resource exhaustion), the parts the older tests leave open, end to end.

A handshake flood from 200 loopback source addresses (127.0.0.2-127.0.0.201; Linux routes all
of 127/8 to lo) while a legitimate agent connects; slow clients on a tunnel port and on the HTTP
port; an agent that stops reading its session socket. Every load loop is bounded in count and
in time. Frame floods and the control-queue cap are tested with their implementation, not here.
"""

import random
import socket
import threading
import time
import urllib.request

import pytest

from diglett import crypto, protocol, wire
from diglett.wire import RejectCode
from tests import harness
from tests.harness import Gateway, connect, wait_until
from tests.plan_peer import TestAgent

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
