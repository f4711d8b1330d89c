"""Soak: a real diglett-server under churn for a set time, its memory, descriptors and greenlets
sampled all along. Not part of the unit run.

    python bench/soak.py                     # 30 minutes of load (~31 minutes in all)
    python bench/soak.py --quick             # 60 s, to try it out
    python bench/soak.py --duration 2100     # any length, in seconds

In a temporary folder it starts diglett-server (SQLite registry, grants made with
diglett-admin, the script hook running /bin/true and the webhook hook posting to a receiver in
this process), bench/backend.py as the echo backend, and keeps until the deadline:

  - STEADY agents that stay connected, and ECHO_WORKERS clients opening streams through them
    at --rate streams/s in all: each sends 1-16 KiB, reads the echo back and compares SHA-256
    digests; one stream in ABORT_EVERY is instead reset (SO_LINGER 0) after writing;
  - CHURN agents that connect, carry a few verified streams, keep one open, and are ended
    with SIGKILL or SIGTERM in turn after a few seconds, then start again;
  - STALLERS clients that ask the backend for an endless download and never read (the
    server holds a full window for them) and IDLERS that connect and send nothing (the
    server resets them at stream_idle_timeout).

Every SAMPLE_EVERY seconds it reads the server process: RSS and PSS (/proc/PID/smaps_rollup),
open descriptors (/proc/PID/fd), threads, CPU time, and from /metrics: greenlets (live, and
dead ones the cyclic GC has not freed yet), agents, open streams and streams opened. At the
deadline every loop stops by itself, and once the server is idle again (only the steady
agents, no stream) its counts are compared with those of the idle start. Results:
bench/soak-results.json and docs/soak.png; the verdict rule is in verdict() below and in
docs/operations.md ("Soak").

Every process is started here and ended by its PID (setups.Proc).

Why ~740 lines: the soak is one long experiment whose load, probes and report must agree on the
same timeline; its parts are sections of one script rather than modules no one else imports.
"""

import argparse
import datetime
import hashlib
import http.server
import json
import os
import platform
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import setups  # noqa: E402
from setups import BIN, READY, TUNNEL_UP, Proc  # noqa: E402

RESULTS = BENCH / "soak-results.json"
CHART = ROOT / "docs" / "soak.png"
MiB = 1 << 20
HEADER = struct.Struct(">cQ")  # bench/backend.py's request header
FOREVER = 1 << 62

STEADY = 4  # long-lived agents
ECHO_WORKERS = 8  # client threads opening echo streams through them
RATE = 40  # echo streams per second, all workers together (the machine is shared: keep it low)
ABORT_EVERY = 10  # one echo stream in this many is reset by the client after writing
ECHO_SIZES = (1024, 16 * 1024)  # bytes per echo stream, uniform in this range
CHURN = 3  # agents that connect and go away in a loop
CHURN_LIFE = (2.0, 10.0)  # seconds a churning agent stays up
CHURN_PAUSE = (0.5, 2.0)  # seconds before it comes back
CHURN_STREAMS = (1, 3)  # verified echo streams per churning session
STALLERS = 2  # endless downloads never read, each held STALL_HOLD seconds, then reset
STALL_HOLD = (15.0, 40.0)
IDLERS = 2  # connections that send nothing, until the server resets them
IDLE_TIMEOUT = 30  # the server's stream_idle_timeout in this run
IO_TIMEOUT = 30  # seconds any blocking socket call of the load may take
SAMPLE_EVERY = 10.0  # seconds between samples of the server
WARMUP = 300.0  # seconds of load before the first window (scaled down for short runs)
WINDOW = 300.0  # seconds in each of the first and last windows compared (idem)
QUIET_TIMEOUT = 90.0  # seconds for the server to go idle after the load stops
SETTLE = 5.0  # seconds of idleness before an idle reading
# "flat": the last window's median is at most the first's plus the larger of RELATIVE and
# ABSOLUTE; and at the idle end fds and greenlets are back at the idle start plus IDLE_SLACK
RELATIVE = 0.10
ABSOLUTE = {"rss": 5 * MiB, "pss": 5 * MiB, "fds": 4, "greenlets": 10, "threads": 2}
IDLE_SLACK = {"fds": 2, "greenlets": 5}
SERIES = ("rss", "pss", "fds", "greenlets", "threads")  # judged ("greenlets": the live ones)
SHOWN = ("greenlets_dead", "agents", "streams_open")  # reported: they follow the load and the GC


def log(message, *args):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), message % args), flush=True)


class Stop(Exception):
    """SIGTERM or SIGINT to the soak itself: clean up and leave."""


# ----- what the load counts ---------------------------------------------------------------------
class Tally:
    """Thread-safe counters of the load, and the first few error messages."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.examples = []

    def add(self, key, amount=1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + amount

    def error(self, key, message):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if len(self.examples) < 20:
                self.examples.append("%s %s: %s" % (time.strftime("%H:%M:%S"), key, message))

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock):
    """Close with an RST (SO_LINGER 0), as a client that crashes does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def recv_exact(sock, size):
    parts, left = [], size
    while left:
        data = sock.recv(min(left, 65536))
        if not data:
            raise ConnectionError("echo ended after %d of %d bytes" % (size - left, size))
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def echo_stream(port, rng, tally, abort=False):
    """One stream: a few KiB up, the same back, digests compared. True if it went right."""
    payload = rng.randbytes(rng.randint(*ECHO_SIZES))
    try:
        sock = connect(port)
    except OSError as exc:
        tally.error("connect_errors", "port %d: %s" % (port, exc))
        return False
    try:
        sock.sendall(HEADER.pack(b"E", 0) + payload)
        if abort:
            reset(sock)
            tally.add("streams_aborted")
            return True
        back = recv_exact(sock, len(payload))
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"":
            raise ConnectionError("more bytes than were sent")
    except (OSError, ConnectionError) as exc:
        tally.error("stream_errors", "port %d: %s" % (port, exc))
        sock.close()
        return False
    sock.close()
    if hashlib.sha256(back).digest() != hashlib.sha256(payload).digest():
        tally.error("echo_mismatches", "port %d: %d bytes differ" % (port, len(payload)))
        return False
    tally.add("streams_ok")
    tally.add("bytes_echoed", len(payload))
    return True


def sleep_until(moment, deadline):
    """Sleep until ``moment`` (monotonic); False if the deadline comes first."""
    pause = min(moment, deadline) - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    return time.monotonic() < deadline


# ----- the load loops (each one ends by itself at the deadline) --------------------------------
def echo_worker(index, ports, rate, deadline, tally):
    rng = random.Random(index)
    step = ECHO_WORKERS / rate  # seconds between this worker's streams
    moment = time.monotonic() + rng.random() * step
    count = 0
    while sleep_until(moment, deadline):
        count += 1
        port = ports[(index + count) % len(ports)]
        echo_stream(port, rng, tally, abort=count % ABORT_EVERY == index % ABORT_EVERY)
        moment = max(moment + step, time.monotonic() - 1.0)  # no catch-up burst after a stall


def churn_worker(index, agent_argv, folder, deadline, tally, running):
    """An agent that comes and goes: SIGKILL and SIGTERM in turn. ``running`` holds the agent
    of the moment, for run() to end if the soak is interrupted."""
    rng = random.Random(1000 + index)
    cycle = 0
    while time.monotonic() < deadline:
        cycle += 1
        agent = running[index] = Proc(agent_argv, folder, "churn%d" % index)
        held = None
        try:
            try:
                port = int(agent.wait_for(TUNNEL_UP, timeout=30).group(2))
            except RuntimeError as exc:
                tally.error("churn_start_errors", str(exc)[:300])
                continue
            tally.add("churn_sessions")
            for _ in range(rng.randint(*CHURN_STREAMS)):
                echo_stream(port, rng, tally)
            try:  # a stream left open when the agent goes
                held = connect(port)
                held.sendall(HEADER.pack(b"E", 0) + b"x" * 100)
                recv_exact(held, 100)
            except (OSError, ConnectionError) as exc:
                tally.error("stream_errors", "held stream, port %d: %s" % (port, exc))
            sleep_until(time.monotonic() + rng.uniform(*CHURN_LIFE), deadline)
        finally:
            if agent.popen.poll() is None:
                signum = signal.SIGKILL if cycle % 2 else signal.SIGTERM
                agent.popen.send_signal(signum)
                try:
                    code = agent.popen.wait(30)
                except subprocess.TimeoutExpired:
                    tally.error("churn_stop_errors", "agent %d ignored SIGTERM" % agent.pid)
                    agent.popen.kill()
                    code = agent.popen.wait(10)
                if signum == signal.SIGKILL:
                    tally.add("churn_sigkill")
                else:
                    tally.add("churn_sigterm")
                    if code != 0:
                        tally.error("churn_stop_errors", "exit %s after SIGTERM" % code)
            if held is not None:
                held.close()
        sleep_until(time.monotonic() + rng.uniform(*CHURN_PAUSE), deadline)


def staller(index, ports, deadline, tally):
    """An endless download that is never read, held for a while, then reset."""
    rng = random.Random(2000 + index)
    while time.monotonic() < deadline:
        try:
            sock = connect(ports[index % len(ports)])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(HEADER.pack(b"D", FOREVER))
        except OSError as exc:
            tally.error("connect_errors", "staller: %s" % exc)
            sleep_until(time.monotonic() + 1, deadline)
            continue
        tally.add("stalls")
        sleep_until(time.monotonic() + rng.uniform(*STALL_HOLD), deadline)
        reset(sock)


def idler(index, ports, deadline, tally):
    """A connection that sends nothing: the server should reset it at stream_idle_timeout."""
    while time.monotonic() < deadline:
        try:
            sock = connect(ports[(index + 1) % len(ports)])
        except OSError as exc:
            tally.error("connect_errors", "idler: %s" % exc)
            sleep_until(time.monotonic() + 1, deadline)
            continue
        opened = time.monotonic()
        sock.settimeout(1.0)
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                closed = sock.recv(1) == b""
            except socket.timeout:
                continue
            except OSError:
                closed = True
        if closed:
            waited = time.monotonic() - opened
            tally.add("idle_closed_by_server")
            if waited < IDLE_TIMEOUT - 1:
                tally.error("idle_early_close", "after %.1f s" % waited)
        sock.close()


# ----- the webhook receiver --------------------------------------------------------------------
class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.posts = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N805
                handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                self.posts += 1
                handler.send_response(204)
                handler.end_headers()

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)


# ----- the server, read from /proc and /metrics ------------------------------------------------
def scrape(http_port):
    """{name: value} of the unlabelled samples of /metrics, and a few label sums."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % http_port, timeout=30) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_part, _, number = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        values[name] = values.get(name, 0) + float(number)  # labelled families: summed
        if name != name_part:
            values[name_part] = float(number)  # and each labelled sample as it is
    return values


def proc_reading(pid):
    status = Path("/proc/%d/status" % pid).read_text()
    threads = int(status.split("Threads:", 1)[1].split()[0])
    memory = {"rss": 0, "pss": 0}  # the server alone, not a hook child caught as it forks
    with open("/proc/%d/smaps_rollup" % pid) as handle:
        for line in handle:
            if line.startswith(("Rss:", "Pss:")):
                memory[line[:3].lower()] = int(line.split()[1]) * 1024
    fields = setups._stat_fields(pid)
    return {"rss": memory["rss"], "pss": memory["pss"], "fds": len(os.listdir("/proc/%d/fd" % pid)),
            "threads": threads,
            "cpu_s": (int(fields[11]) + int(fields[12])) / setups.CLOCK_TICKS}


class Sampler:
    def __init__(self, pid, http_port, tally, started):
        self.pid, self.http_port, self.tally, self.started = pid, http_port, tally, started
        self.samples = []

    def sample(self, phase):
        reading = proc_reading(self.pid)
        metrics = scrape(self.http_port)
        reading.update({
            "t": round(time.monotonic() - self.started, 2), "phase": phase,
            "greenlets": int(metrics.get('diglett_greenlets{state="live"}', -1)),
            "greenlets_dead": int(metrics.get('diglett_greenlets{state="dead"}', -1)),
            "agents": int(metrics.get("diglett_agents_connected", 0)),
            "streams_open": int(metrics.get("diglett_streams_open", 0)),
            "streams_opened": int(metrics.get("diglett_streams_opened_total", 0)),
            "hook_deliveries": int(metrics.get("diglett_hook_deliveries_total", 0)),
            "hook_failures": int(metrics.get("diglett_hook_failures_total", 0)),
            "load": self.tally.snapshot(),
        })
        self.samples.append(reading)
        return reading


def wait_idle(sampler, steady, timeout):
    """Sample until only the steady agents are connected, no stream is open and the hook
    deliveries stopped moving; then SETTLE seconds more."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        reading = sampler.sample("draining")
        if (reading["agents"] == steady and reading["streams_open"] == 0 and last is not None
                and reading["hook_deliveries"] == last["hook_deliveries"]):
            break
        last = reading
        time.sleep(2)
    else:
        log("the server did not go idle within %.0f s", timeout)
    time.sleep(SETTLE)
    return sampler.sample("idle")


# ----- the summary ----------------------------------------------------------------------------
def window_medians(load, start, length):
    chosen = [s for s in load if start <= s["t"] < start + length]
    return {key: statistics.median(s[key] for s in chosen) for key in SERIES + SHOWN}, len(
        chosen)


def slope_per_hour(points):
    """Least-squares slope of (t seconds, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if not spread:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600


def verdict(samples, load_start, load_end, warmup, window):
    """The first window starts after the warm-up, the last one ends with the load."""
    load = [s for s in samples if s["phase"] == "load"]
    first, first_n = window_medians(load, load_start + warmup, window)
    last, last_n = window_medians(load, load_end - window, window + 1)
    after = [s for s in load if s["t"] >= load_start + warmup]
    series = {}
    for key in SERIES:
        allowed = max(first[key] * RELATIVE, ABSOLUTE[key])
        series[key] = {"first": first[key], "last": last[key], "change": last[key] - first[key],
                       "allowed": allowed, "flat": last[key] <= first[key] + allowed,
                       "slope_per_hour": slope_per_hour([(s["t"], s[key]) for s in after]),
                       "min": min(s[key] for s in load), "max": max(s[key] for s in load)}
    shown = {key: {"first": first[key], "last": last[key], "min": min(s[key] for s in load),
                   "max": max(s[key] for s in load)} for key in SHOWN}
    idle_start = next(s for s in samples if s["phase"] == "idle-start")
    idle_end = [s for s in samples if s["phase"] == "idle"][-1]
    idle = {}
    for key in SERIES + SHOWN:
        entry = {"start": idle_start[key], "end": idle_end[key]}
        if key in IDLE_SLACK:
            entry["back"] = idle_end[key] <= idle_start[key] + IDLE_SLACK[key]
        idle[key] = entry
    flat = all(v["flat"] for v in series.values()) and all(
        v.get("back", True) for v in idle.values())
    return {"windows": {"first": [load_start + warmup, load_start + warmup + window, first_n],
                        "last": [load_end - window, load_end, last_n]},
            "series": series, "shown": shown, "idle": idle, "flat": flat}


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    zero = results["load_start"]
    minutes = [(s["t"] - zero) / 60 for s in samples]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    panels = [
        ("server memory", "MiB", [("RSS", [s["rss"] / MiB for s in samples]),
                                  ("PSS", [s["pss"] / MiB for s in samples])]),
        ("server open file descriptors", "fds", [("fds", [s["fds"] for s in samples])]),
        ("greenlets (diglett_greenlets)", "greenlets",
         [("live", [s["greenlets"] for s in samples]),
          ("dead, not yet collected", [s["greenlets_dead"] for s in samples])]),
        ("server threads", "threads", [("threads", [s["threads"] for s in samples])]),
        ("agents and open streams (/metrics)", "count",
         [("agents", [s["agents"] for s in samples]),
          ("streams open", [s["streams_open"] for s in samples])]),
        ("streams opened per second (/metrics)", "streams/s", [("rate", [0] + [
            max(0, b["streams_opened"] - a["streams_opened"]) / max(1e-9, b["t"] - a["t"])
            for a, b in zip(samples, samples[1:])])]),
    ]
    windows = results["verdict"]["windows"]
    for ax, (title, unit, lines) in zip([a for row in axes for a in row], panels):
        for label, values in lines:
            ax.plot(minutes, values, label=label, linewidth=1)
        for name, (start, end, _n) in windows.items():
            ax.axvspan((start - zero) / 60, (end - zero) / 60, color="#cccccc", alpha=0.35,
                       label=None)
        ax.axvline((results["load_end"] - zero) / 60, color="black", linestyle=":",
                   linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        ax.set_ylim(bottom=0)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the load started (grey: the compared windows; "
                      "dotted: load stops)", fontsize=8)
    fig.suptitle("diglett soak, %.0f min, %s: %s" % (
        results["duration_s"] / 60, results["date"][:10],
        "flat" if results["verdict"]["flat"] else "NOT flat"), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results):
    """The table of docs/operations.md's "Soak" section."""
    rows = ["| series | first window (median) | last window (median) | change | allowed | "
            "slope per hour | range under load | idle start -> end | |",
            "|---|---|---|---|---|---|---|---|---|"]
    verdict_ = results["verdict"]
    for key in SERIES:
        entry, idle = verdict_["series"][key], verdict_["idle"][key]
        if key in ("rss", "pss"):
            show = lambda v, sign="": ("%" + sign + ".1f MiB") % (v / MiB)  # noqa: E731
        else:
            show = lambda v, sign="": ("%" + sign + ".1f") % v  # noqa: E731
        back = {True: ", back", False: ", NOT back", None: ""}[idle.get("back")]
        rows.append("| %s | %s | %s | %s | %s | %s | %s - %s | %s -> %s%s | %s |" % (
            "greenlets (live)" if key == "greenlets" else key, show(entry["first"]),
            show(entry["last"]), show(entry["change"], "+"), show(entry["allowed"]),
            show(entry["slope_per_hour"], "+"), show(entry["min"]), show(entry["max"]),
            show(idle["start"]), show(idle["end"]), back, "flat" if entry["flat"] else "GREW"))
    dead = verdict_["shown"]["greenlets_dead"]
    rows.append("| greenlets (dead) | %.1f | %.1f | | | | %d - %d | %d -> %d | not judged |" % (
        dead["first"], dead["last"], dead["min"], dead["max"],
        verdict_["idle"]["greenlets_dead"]["start"], verdict_["idle"]["greenlets_dead"]["end"]))
    return "\n".join(rows) + "\n"


# ----- the run --------------------------------------------------------------------------------
def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib into %s", sys.prefix)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)


def write_config(path, http_port_hint, webhook_url):
    path.write_text("\n".join([
        "[server]",
        "listen = 127.0.0.1:0",
        "http = 127.0.0.1:0",
        "domain = soak.test",
        "key = server.key",
        "database = registry.db",
        "stream_idle_timeout = %d" % IDLE_TIMEOUT,
        "workers = 1",  # the soak watches one server process (bench/aggregate.py: workers)
        "",
        "[hooks]",
        "enabled = script, webhook",
        "",
        "[hook:script]",
        "command = /bin/true",
        "",
        "[hook:webhook]",
        "url = %s" % webhook_url,
        "",
    ]))


def admin(config, *args):
    return subprocess.run([str(BIN / "diglett-admin"), "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def new_agent_argv(folder, config, name, gateway, server_key, backend_port):
    key_file = folder / ("%s.key" % name)
    public = subprocess.run([str(BIN / "diglett"), "keygen", "--key-file", str(key_file)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    admin(config, "grant", name, "--key", public.strip())
    return [str(BIN / "diglett"), "-g", gateway, "-n", name, "--key-file", str(key_file),
            "--server-key", server_key, "127.0.0.1:%d" % backend_port]


def log_problems(text):
    lines = text.splitlines()
    return {"lines": len(lines),
            "tracebacks": sum(1 for line in lines if line.startswith("Traceback")),
            "errors": sum(1 for line in lines if " ERROR " in line or "level=error" in line
                          or '"level": "error"' in line),
            "warnings": sum(1 for line in lines if " WARNING " in line
                            or "level=warning" in line or '"level": "warning"' in line)}


def run(args, folder):
    procs = []
    tally = Tally()
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    threads = []
    churning = [None] * CHURN  # the churn agent of each churn loop, if any
    try:
        backend = Proc([sys.executable, str(BENCH / "backend.py")], folder, "backend")
        procs.append(backend)
        backend_port = int(backend.wait_for(r"listening (\d+)").group(1))
        config = folder / "server.conf"
        write_config(config, 0, "http://127.0.0.1:%d/hook" % receiver.server_address[1])
        server = Proc([str(BIN / "diglett-server"), "-c", str(config)], folder, "server")
        procs.append(server)
        ready = server.wait_for(READY)
        gateway = "%s:%s" % ready.group(1, 2)
        http_port, server_key = int(ready.group(4)), ready.group(5)
        log("server PID %d, agents at %s, http port %d, folder %s", server.pid, gateway,
            http_port, folder)
        argv = {}
        for name in ["steady%d" % i for i in range(STEADY)] + ["churn%d" % i
                                                              for i in range(CHURN)]:
            argv[name] = new_agent_argv(folder, config, name, gateway, server_key, backend_port)
        ports = []
        for i in range(STEADY):
            agent = Proc(argv["steady%d" % i], folder, "steady%d" % i)
            procs.append(agent)
            ports.append(int(agent.wait_for(TUNNEL_UP).group(2)))
        clock = time.monotonic()
        sampler = Sampler(server.pid, http_port, tally, clock)
        wait_idle(sampler, STEADY, QUIET_TIMEOUT)
        sampler.samples[-1]["phase"] = "idle-start"

        load_start = time.monotonic() - clock
        deadline = time.monotonic() + args.duration
        log("load for %.0f s: %d steady agents at %d echo streams/s, %d churning agents, "
            "%d stallers, %d idlers", args.duration, STEADY, args.rate, CHURN, STALLERS, IDLERS)
        jobs = ([(echo_worker, (i, ports, args.rate, deadline, tally))
                 for i in range(ECHO_WORKERS)]
                + [(churn_worker, (i, argv["churn%d" % i], folder, deadline, tally, churning))
                   for i in range(CHURN)]
                + [(staller, (i, ports, deadline, tally)) for i in range(STALLERS)]
                + [(idler, (i, ports, deadline, tally)) for i in range(IDLERS)])
        for target, job_args in jobs:
            thread = threading.Thread(target=target, args=job_args, daemon=True)
            thread.start()
            threads.append(thread)
        next_sample = time.monotonic()
        next_log = time.monotonic() + 60
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.popen.poll() is not None:
                    raise RuntimeError("%s exited with %s:\n%s" % (
                        proc.label, proc.popen.returncode, proc.output()[-3000:]))
            reading = sampler.sample("load")
            if time.monotonic() >= next_log:
                next_log += 60
                log("t=%4.0f s  rss %.1f MiB  pss %.1f MiB  fds %d  greenlets %d (+%d dead)  "
                    "threads %d  agents %d  streams %d  load %s", reading["t"] - load_start,
                    reading["rss"] / MiB, reading["pss"] / MiB, reading["fds"],
                    reading["greenlets"], reading["greenlets_dead"], reading["threads"],
                    reading["agents"],
                    reading["streams_open"], reading["load"])
            next_sample += args.interval
            sleep_until(next_sample, deadline)
        load_end = time.monotonic() - clock
        sampler.sample("load")
        log("load over; waiting for its loops to end")
        for thread in threads:
            thread.join(IO_TIMEOUT + 60)
            if thread.is_alive():
                tally.error("loops_overrun", "%s did not end" % thread.name)
        log("waiting for the server to go idle")
        idle = wait_idle(sampler, STEADY, QUIET_TIMEOUT)
        final_metrics = scrape(http_port)
        cpu_total = idle["cpu_s"] - sampler.samples[0]["cpu_s"]
    finally:
        for proc in [p for p in churning if p is not None] + procs[::-1]:
            proc.stop()
        receiver.shutdown()
    load = tally.snapshot()
    warmup = min(WARMUP, args.duration / 6)
    window = min(WINDOW, args.duration / 4)
    result = verdict(sampler.samples, load_start, load_end, warmup, window)
    server_log = log_problems(server.output())
    errors = {key: load.get(key, 0) for key in (
        "stream_errors", "connect_errors", "echo_mismatches", "churn_start_errors",
        "churn_stop_errors", "idle_early_close", "loops_overrun")}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release()},
        "duration_s": args.duration, "interval_s": args.interval,
        "load_start": load_start, "load_end": load_end, "warmup_s": warmup, "window_s": window,
        "plan": {"steady_agents": STEADY, "echo_workers": ECHO_WORKERS,
                 "echo_rate_per_s": args.rate, "echo_bytes": ECHO_SIZES,
                 "abort_every": ABORT_EVERY, "churn_agents": CHURN, "churn_life_s": CHURN_LIFE,
                 "churn_pause_s": CHURN_PAUSE, "stallers": STALLERS, "stall_hold_s": STALL_HOLD,
                 "idlers": IDLERS, "stream_idle_timeout": IDLE_TIMEOUT,
                 "hooks": ["script (/bin/true)", "webhook (a receiver in the soak)"],
                 "rule": {"relative": RELATIVE, "absolute": ABSOLUTE, "idle_slack": IDLE_SLACK}},
        "totals": {
            "load": load, "errors": errors, "error_total": sum(errors.values()),
            "error_examples": tally.examples,
            "streams_opened": int(final_metrics.get("diglett_streams_opened_total", 0)),
            "sessions_ended": int(final_metrics.get("diglett_session_duration_seconds_count", 0)),
            "idle_resets": int(final_metrics.get("diglett_idle_stream_resets_total", 0)),
            "hook_deliveries": int(final_metrics.get("diglett_hook_deliveries_total", 0)),
            "hook_failures": int(final_metrics.get("diglett_hook_failures_total", 0)),
            "hook_dead": int(final_metrics.get("diglett_hook_dead_total", 0)),
            "webhook_posts": receiver.posts,
            "agent_refusals": int(final_metrics.get("diglett_agent_refusals_total", 0)),
            "server_cpu_s": cpu_total,
            "server_cpu_share": cpu_total / max(1e-9, idle["t"] - sampler.samples[0]["t"]),
            "server_log": server_log,
        },
        "verdict": result,
        "samples": sampler.samples,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--quick", action="store_true", help="60 s of load, samples every 2 s")
    parser.add_argument("--interval", type=float, default=None, help="seconds between samples")
    parser.add_argument("--rate", type=float, default=RATE, help="echo streams per second")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--report", action="store_true",
                        help="print the table of docs/operations.md from --out and redraw "
                             "--chart; run nothing")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(args.out.read_text())
        chart(results, args.chart)
        print(markdown(results), end="")
        return 0
    if args.quick:
        args.duration = 60.0
    if args.interval is None:
        args.interval = 2.0 if args.quick else SAMPLE_EVERY
    ensure_matplotlib()

    def stop(signum, _frame):
        raise Stop("signal %d" % signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    folder = Path(tempfile.mkdtemp(prefix="diglett-soak-"))
    results = run(args, folder)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    chart(results, args.chart)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    summary = results["verdict"]
    for key, entry in summary["series"].items():
        scale = MiB if key in ("rss", "pss") else 1
        log("%-9s first %9.1f  last %9.1f  change %+8.1f (allowed %.1f)  slope %+.1f/h  %s",
            key, entry["first"] / scale, entry["last"] / scale, entry["change"] / scale,
            entry["allowed"] / scale, entry["slope_per_hour"] / scale,
            "flat" if entry["flat"] else "GREW")
    for key, entry in summary["idle"].items():
        scale = MiB if key in ("rss", "pss") else 1
        log("idle %-9s start %.1f  end %.1f  %s", key, entry["start"] / scale,
            entry["end"] / scale, {True: "back", False: "NOT back", None: ""}[entry.get("back")])
    log("totals: %s", json.dumps({k: v for k, v in results["totals"].items()
                                  if k != "error_examples"}))
    for example in results["totals"]["error_examples"]:
        log("error: %s", example)
    log("verdict: %s; wrote %s and %s", "flat" if summary["flat"] else "NOT flat", args.out,
        args.chart)
    return 0 if summary["flat"] and not results["totals"]["error_total"] else 1


if __name__ == "__main__":
    sys.exit(main())
