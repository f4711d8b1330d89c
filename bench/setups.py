"""The setups the benchmark compares, and what /proc says about their processes.

A setup starts its processes in a folder of its own, exposes one port on 127.0.0.1 that
leads to the backend, and names the root processes whose whole tree is "the tunnel" (their
CPU time and memory are what the benchmark charges). Every process is started here with
its output in files, and ended by its PID.

Why ~440 lines: every setup the benchmark compares (direct, socat, ssh -R, diglett with each
cipher) is started and measured the same way here, so a difference in the figures is a
difference in the setup, not in the harness.
"""

import getpass
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from diglett import readyfile

BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20  # seconds for a setup's processes to come up
STOP_TIMEOUT = 10  # seconds between SIGTERM and SIGKILL
OLD_READY = re.compile(r"ready: agents=(\S+):(\d+) http=\S+ domain=\S+ key=([0-9a-f]{66})")
TUNNEL_UP = re.compile(r"tunnel up: (\S+) -> \S+ \(server port (\d+)\)")
RELOADED = "reloaded "
SSH_ALLOCATED = re.compile(r"Allocated port (\d+) for remote forward")
CRYPTOGRAPHY_LIB = "cryptography/hazmat/bindings"  # in /proc/PID/maps once it is imported


# ----- /proc ------------------------------------------------------------------------------------
def _stat_fields(pid):
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces)."""
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()


def descendants(roots):
    """``roots`` and every live process below them."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError):
                pass  # gone meanwhile
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(roots):
    """utime + stime of the trees under ``roots``, plus that of their reaped children."""
    ticks = 0
    for pid in descendants(roots):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def memory(roots):
    """{"rss", "pss"} in bytes, summed over the trees under ``roots``."""
    rss = pss = 0
    for pid in descendants(roots):
        try:
            with open("/proc/%d/smaps_rollup" % pid) as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {"rss": rss, "pss": pss}


def listening(port):
    """True once something listens on 127.0.0.1:port (read from /proc/net/tcp, no connect)."""
    wanted = "0100007F:%04X" % port
    with open("/proc/net/tcp") as handle:
        return any(line.split()[1] == wanted and line.split()[3] == "0A"
                   for line in list(handle)[1:])


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.05)


# ----- processes --------------------------------------------------------------------------------
class Proc:
    """A child process with stdout and stderr in files of ``folder``."""

    def __init__(self, argv, folder, label, env=None, supervisor=None):
        """``supervisor``: run as systemd would, with its fd store (bench/handover.py)."""
        self.label = label
        self.out_path = Path(folder) / ("%s.out" % label)
        self.err_path = Path(folder) / ("%s.err" % label)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        extra = {}
        if supervisor is not None:
            argv, env, extra = supervisor.popen(argv, env)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=folder, env=env,
                **extra)
        self.pid = self.popen.pid

    def output(self):
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait_for(self, pattern, timeout=START_TIMEOUT):
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def found():
            match = regex.search(self.output())
            if match is None and self.popen.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (
                    self.label, self.popen.returncode, self.output()[-3000:]))
            return match

        return wait_until(found, timeout, "%s to print %r" % (self.label, regex.pattern))

    def stop(self):
        """SIGTERM this process and whatever it forked, SIGKILL what is left after a while."""
        if self.popen.poll() is not None:
            return
        tree = descendants([self.pid])
        for pid in tree:
            _signal(pid, signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal(self.pid, signal.SIGKILL)
            self.popen.wait(STOP_TIMEOUT)
        for pid in tree[1:]:  # forked children (socat, sshd sessions) we did not reap
            _signal(pid, signal.SIGKILL)


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ----- setups -----------------------------------------------------------------------------------
class Setup:
    """Something that carries 127.0.0.1:``port`` to the backend."""

    name = "?"
    port = None

    def __init__(self, folder, backend_port):
        self.folder = Path(folder) / self.name.replace(" ", "_")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.backend_port = backend_port
        self.procs = []

    def start(self):
        raise NotImplementedError

    def roots(self):
        """PIDs whose process trees are the tunnel (charged CPU and memory)."""
        return [proc.pid for proc in self.procs]

    def check(self):
        """Raise if a process of the setup has died."""
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise RuntimeError("%s of %s exited with %s:\n%s" % (
                    proc.label, self.name, proc.popen.returncode, proc.output()[-3000:]))

    def stop(self):
        for proc in reversed(self.procs):
            proc.stop()

    def describe(self):
        return {}


class Direct(Setup):
    """The client talks to the backend itself: the limit of this machine and load generator."""

    name = "direct"

    def start(self):
        self.port = self.backend_port


class Socat(Setup):
    """One bare relay hop in C, one forked process per connection."""

    name = "socat"

    def start(self):
        self.port = free_port()
        self.procs.append(Proc(
            ["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork,backlog=1024" % self.port,
             "TCP:127.0.0.1:%d" % self.backend_port], self.folder, "socat"))
        wait_until(lambda: listening(self.port), START_TIMEOUT, "socat to listen")


class Ssh(Setup):
    """``ssh -R`` to a throwaway sshd on loopback: OpenSSH's default cipher, no compression."""

    name = "ssh -R"

    def start(self):
        folder = self.folder
        for key in ("host_key", "client_key"):
            if not (folder / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(folder / key)], check=True, timeout=30)
        (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation folder
        sshd_port = free_port()
        (folder / "sshd_config").write_text("\n".join([
            "Port %d" % sshd_port,
            "ListenAddress 127.0.0.1",
            "HostKey %s" % (folder / "host_key"),
            "PidFile %s" % (folder / "sshd.pid"),
            "AuthorizedKeysFile %s" % (folder / "authorized_keys"),
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel INFO",
        ]) + "\n")
        sshd = Proc(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                    folder, "sshd")
        self.procs.append(sshd)
        sshd.wait_for("Server listening on 127.0.0.1 port %d" % sshd_port)
        client = Proc(["ssh", "-F", "/dev/null", "-N", "-T", "-o", "Compression=no",
                       "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                       "-o", "StrictHostKeyChecking=accept-new",
                       "-o", "UserKnownHostsFile=%s" % (folder / "known_hosts"),
                       "-o", "ExitOnForwardFailure=yes", "-i", str(folder / "client_key"),
                       "-p", str(sshd_port), "-R", "0:127.0.0.1:%d" % self.backend_port,
                       "%s@127.0.0.1" % getpass.getuser()], folder, "ssh")
        self.procs.append(client)
        self.port = int(client.wait_for(SSH_ALLOCATED).group(1))
        wait_until(lambda: listening(self.port), START_TIMEOUT, "sshd's forwarded port")

    def describe(self):
        options = subprocess.run(["ssh", "-F", "/dev/null", "-G", "127.0.0.1"],
                                 capture_output=True, text=True, timeout=10).stdout
        ciphers = re.search(r"^ciphers (\S+)", options, re.M)
        return {"cipher": ciphers.group(1).split(",")[0] if ciphers else "?"}


class Diglett(Setup):
    """diglett-server and one agent from the CLIs, the AEAD backend forced through
    bench/aead/sitecustomize.py (DIGLETT_AEAD)."""

    def __init__(self, folder, backend_port, aead, source=None, label="", extra_env=None,
                 wrap=(), start_timeout=START_TIMEOUT):
        """``source``: a folder holding another diglett package to run instead of the venv's
        (run.py's --rev); ``label`` tells it apart in the name (bench/rtt.py's --baseline);
        ``wrap``: a command both processes run under (bench/rtt.py's valgrind)."""
        self.aead = aead
        self.wrap = list(wrap)
        self.start_timeout = start_timeout
        self.source = source
        self.name = "diglett (%s)%s" % (aead, label and " " + label)
        super().__init__(folder, backend_port)
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [
            str(BENCH / "aead"), source and str(source), os.environ.get("PYTHONPATH")])),
            "DIGLETT_AEAD": aead, **(extra_env or {})}
        self.config = self.folder / "server.conf"

    def write_config(self, **extra):
        settings = {"listen": "127.0.0.1:0", "http": "127.0.0.1:0", "domain": "bench.test",
                    "key": "server.key", "database": "registry.db"}
        if self.source is None:
            # one agent: one process carries it, as in the earlier runs (a --rev checkout may
            # predate the key); bench/aggregate.py measures several workers
            settings["workers"] = 1
        settings.update(extra)
        self.config.write_text("[server]\n" + "".join(
            "%s = %s\n" % item for item in settings.items()))

    def _start_server(self):
        """(server key, agents' HOST:PORT) of a started diglett-server."""
        argv = self.command("diglett-server") + ["-c", str(self.config)]
        ready_file = self.folder / "server.ready"
        if self.source and not _has_ready_file(self.source):
            server = Proc(argv, self.folder, "server", self.env)
            self.procs.append(server)
            ready = server.wait_for(OLD_READY)  # a revision from before --ready-file
            return ready.group(3), "%s:%s" % ready.group(1, 2)
        server = Proc(argv + ["--ready-file", str(ready_file)], self.folder, "server", self.env)
        self.procs.append(server)
        try:
            ready = readyfile.wait(ready_file, self.start_timeout, server.popen.poll)
        except readyfile.NotReady as exc:
            raise RuntimeError("%s:\n%s" % (exc, server.output()[-3000:])) from None
        return ready["key"], "%s:%d" % (ready["agents"]["host"], ready["agents"]["port"])

    def command(self, script):
        """argv that runs one of the venv's diglett scripts, under ``wrap`` if any."""
        if not self.wrap:
            return [str(BIN / script)]
        return self.wrap + [sys.executable, str(BIN / script)]

    def server_options(self):
        """Extra [server] keys of this setup (a transport's listener)."""
        return {}

    def agent_gateway(self, gateway):
        """What the agent's -g says, given the server's raw agent address."""
        return gateway

    def start(self):
        self.write_config(**self.server_options())
        server_key, gateway = self._start_server()
        key_file = self.folder / "agent.key"
        if not key_file.exists():
            env = dict(os.environ, **self.env)
            public = subprocess.run([str(BIN / "diglett"), "keygen", "--key-file", str(key_file)],
                                    capture_output=True, text=True, timeout=30, check=True,
                                    env=env)
            subprocess.run([str(BIN / "diglett-admin"), "-c", str(self.config), "grant", "bench",
                            "--key", public.stdout.strip()], capture_output=True, timeout=30,
                           check=True, env=env)
        agent = Proc(self.command("diglett") + [
            "-g", self.agent_gateway(gateway), "-n", "bench", "--proxy", "none", "--key-file",
            str(key_file), "--server-key", server_key, "127.0.0.1:%d" % self.backend_port],
            self.folder, "agent", self.env)
        self.procs.append(agent)
        self.port = int(agent.wait_for(TUNNEL_UP, self.start_timeout).group(2))
        self.verify_aead()

    def verify_aead(self):
        """Both processes run the AEAD backend this setup claims (read from their maps)."""
        for proc in self.procs:
            with open("/proc/%d/maps" % proc.pid) as handle:
                loaded = CRYPTOGRAPHY_LIB in handle.read()
            if loaded != (self.aead == "cryptography"):
                raise RuntimeError("%s of %s: cryptography %s loaded" % (
                    proc.label, self.name, "is" if loaded else "is not"))

    def reconfigure(self, **extra):
        """Rewrite the config with ``extra`` keys and SIGHUP the server; wait for the reload."""
        server = self.procs[0]
        before = server.output().count(RELOADED)
        self.write_config(**extra)
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: server.output().count(RELOADED) > before, START_TIMEOUT,
                   "the server to reload")

    def describe(self):
        return {"aead": self.aead}


class DiglettTransport(Diglett):
    """diglett with the agent on another transport (issue 11): ``tls`` or ``ws`` straight to
    the server's listener, or ``wss`` through a Traefik that terminates TLS, as deployed."""

    ENDPOINT = re.compile(r"agents over (tls|ws) on 127\.0\.0\.1:(\d+)")

    def __init__(self, folder, backend_port, aead, transport):
        super().__init__(folder, backend_port, aead)
        self.transport = transport
        self.name = "diglett %s (%s)" % (transport, aead)
        self.folder = Path(folder) / self.name.replace(" ", "_")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "server.conf"

    def server_options(self):
        return {"listen_tls": "127.0.0.1:0", "listen_ws": "127.0.0.1:0"}

    def agent_gateway(self, gateway):
        server = self.procs[0]
        wait_until(lambda: len(self.ENDPOINT.findall(server.output())) == 2, START_TIMEOUT,
                   "the server's transport listeners")
        ports = dict(self.ENDPOINT.findall(server.output()))
        if self.transport == "tls":
            return "tls://127.0.0.1:%s" % ports["tls"]
        if self.transport == "ws":
            return "ws://127.0.0.1:%s/diglett" % ports["ws"]
        return self._traefik(int(ports["ws"]))

    def _traefik(self, ws_port):
        """Traefik on its own port terminating TLS and forwarding the upgrade: wss as run."""
        port = free_port()
        dynamic = self.folder / "routes.yml"  # JSON is YAML; not traefik.yml: its static file
        dynamic.write_text(json.dumps({"http": {
            "routers": {"agents": {"entryPoints": ["websecure"], "tls": {}, "service": "ws",
                                   "rule": "PathPrefix(`/diglett`)"}},
            "services": {"ws": {"loadBalancer": {
                "servers": [{"url": "http://127.0.0.1:%d" % ws_port}]}}}}}))
        traefik = Proc([str(BIN / "traefik"), "--entrypoints.websecure.address=127.0.0.1:%d"
                        % port, "--providers.file.filename=%s" % dynamic, "--log.level=ERROR"],
                       self.folder, "traefik")
        self.procs.append(traefik)  # charged too: it is part of the path on a real gateway
        # a connect, not /proc/net/tcp: a Go listener may not show there under gVisor
        wait_until(lambda: _connects(port), START_TIMEOUT, "traefik to listen")
        time.sleep(1.0)  # the file provider loads its routes just after the listen
        return "wss://127.0.0.1:%d/diglett" % port

    def verify_aead(self):
        self.procs, traefik = [p for p in self.procs if p.label != "traefik"], \
            [p for p in self.procs if p.label == "traefik"]
        try:
            super().verify_aead()
        finally:
            self.procs += traefik


def _connects(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _has_ready_file(source):
    """True when the diglett in ``source`` (run.py's --rev) knows ``--ready-file``."""
    return any("--ready-file" in path.read_text(errors="replace")
               for path in (Path(source) / "diglett").rglob("*.py"))
