"""Probes of a running server process and small helpers shared by the end-to-end tests:
its open descriptors and memory (/proc), its /metrics, a value that settles, a server started
under prlimit, and an agent that dials a relay instead of the server."""

import os
import time
import urllib.request

from tests.support import harness
from tests.support.harness import Proc, connect

KiB, MiB = 1 << 10, 1 << 20


def metric(gateway, name):
    url = "http://%s:%d/metrics" % gateway.http_address
    with urllib.request.urlopen(url, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "_total "):
                return float(line.split()[-1])
    return None


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def vm_status(pid, field):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no %s for pid %d" % (field, pid))


def agent_via(gw, name, backend, gateway, label, key_file=None):
    """A real agent for ``name`` dialling ``gateway`` (a relay) instead of the server."""
    if key_file is None:
        key_file, public = gw.new_key(label)
        gw.grant(name, public)
    argv = harness.command("diglett") + [
        "-g", gateway, "-n", name, "--key-file", str(key_file), "--server-key", gw.key,
        backend if isinstance(backend, str) else "%s:%d" % backend]
    agent = harness.Agent(argv, gw.workdir, label)
    gw.agents.append(agent)
    agent.wait_up()
    return agent


def echo_ok(port, payload=b"still here"):
    with connect(port, timeout=5) as sock:
        sock.sendall(payload)
        assert harness.recv_exact(sock, len(payload)) == payload


def timed_get(gw, path):
    started = time.monotonic()
    body = gw.http_get(path, timeout=5)
    return time.monotonic() - started, body


def start_limited_server(gw, limit_argv, timeout=20):
    """Start ``gw``'s server under ``prlimit`` (e.g. ["--nofile=200"])."""
    gw.proc = Proc(["prlimit", *limit_argv, "--"] + harness.command("diglett-server")
                   + ["-c", str(gw.config_path)], gw.workdir, "server")
    match = gw.proc.wait_for(harness.READY, timeout)
    gw.agent_address = (match.group(1), int(match.group(2)))
    gw.http_address = (match.group(3), int(match.group(4)))
    gw.key = match.group(5)
    return gw


def wait_stable(measure, timeout, settle=1.0, what="a stable value"):
    """A value of ``measure()`` that did not change for ``settle`` s."""
    deadline = time.monotonic() + timeout
    last, since = measure(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = measure()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError("no %s within %.0f s (last %r)" % (what, timeout, last))

