"""The worker processes of a diglett-server with ``workers > 1``, as the master sees them.

The master accepts on the agent port (and on listen_tls / listen_ws) and hands each
connection to the next worker in turn, its descriptor passed over the worker's channel
(diglett.channel: SCM_RIGHTS, as handoff.py does with systemd). Accepting in one place,
rather than letting the kernel wake every worker on a shared socket, spreads agents evenly
and predictably, and costs one sendmsg per agent connection, never per byte: the tunnel's
data goes between the agent and its worker only. The master also relays a name's tunnel
port from one worker to another when its agent's key moves (diglett.gateway.siblings).

Workers are fresh interpreters (``python -m diglett.cli.worker``), not forks: a forked gevent
hub, database thread or hook greenlet would be shared state nobody owns. Each is a gateway
of the registry's fleet under its own id, GATEWAY_ID.wN, kept across its restarts, so a
restarted worker's start-up ends the sessions its crashed run left (end_stale), and the old
session of a name that moved to another worker ends as in a fleet, when the registry shows
the new one (RegistryPoller.check_takeovers).
"""

import logging
import os
import signal
import subprocess
import sys
import time

import gevent
import gevent.event
from gevent import socket

from diglett import channel as channels

log = logging.getLogger(__name__)

RESTART_FIRST = 0.5  # seconds before restarting a worker that exited on its own
RESTART_MAX = 10.0  # cap of the doubling delay, for a worker that keeps failing at start
STABLE_AFTER = 30.0  # seconds up after which a worker's next crash restarts it at once again
PASS_WAIT = 5.0  # seconds a connection waits for a worker to be ready before it is closed
STOP_MARGIN = 5.0  # seconds beyond drain and shutdown timeouts before a worker is killed
GATEWAY_ID_MAX = 63  # the registry's column
FULL_LOG_INTERVAL = 10.0  # seconds between "does not keep up" lines of one worker


class WorkersNotReady(Exception):
    """A worker did not report ready in time at start-up (its own log lines say why)."""


def worker_gateway_id(gateway_id, index):
    suffix = ".w%d" % index
    return gateway_id[:GATEWAY_ID_MAX - len(suffix)] + suffix


def served_here(gateway, gateway_id):
    """Whether a session row's ``gateway`` is this server's: itself, or one of its workers."""
    if gateway == gateway_id:
        return True
    base, _, index = gateway.rpartition(".w")
    return index.isdigit() and gateway == worker_gateway_id(gateway_id, int(index)) and \
        bool(base)


class Worker:
    """One worker process and its channel; restarted while the pool runs."""

    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.gateway_id = worker_gateway_id(pool.cfg.gateway_id, index)
        self.http_socket = os.path.join(pool.rundir, "w%d.sock" % index)
        self.proc = None
        self.channel = None
        self.ready = gevent.event.Event()
        self.restarts = 0
        self._full_logged = -FULL_LOG_INTERVAL  # last "does not keep up" line
        self._loop = None

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self):
        self._loop = gevent.spawn(self._run)

    def _run(self):
        delay = RESTART_FIRST
        while not self.pool.stopping:
            started = time.monotonic()
            try:
                self._spawn()
            except OSError as exc:
                log.error("worker %d cannot be started: %s", self.index, exc)
            else:
                reader = gevent.spawn(self._read_channel, self.channel)
                code = self.proc.wait()
                self.ready.clear()
                reader.kill()
                self.channel.close()
                if self.pool.stopping:
                    return
                log.error("worker %d (pid %d) exited with %s: restarting it", self.index,
                          self.proc.pid, _describe_exit(code))
            self.restarts += 1
            if time.monotonic() - started > STABLE_AFTER:
                delay = RESTART_FIRST
            gevent.sleep(delay)
            delay = min(RESTART_MAX, delay * 2)

    def _spawn(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pool = self.pool
        argv = [sys.executable, "-m", "diglett.cli.worker", "-c", str(pool.cfg.path),
                "--index", str(self.index), "--channel-fd", str(theirs.fileno()),
                "--http-socket", self.http_socket, "--listen", "%s:%d" % pool.agent_address,
                "--gateway-id", self.gateway_id]
        if pool.log_level:
            argv += ["--log-level", pool.log_level]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FDSTORE")}
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), env=env)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.channel = ours
        log.info("worker %d started: pid %d gateway=%s", self.index, self.proc.pid,
                 self.gateway_id)

    def _read_channel(self, channel):
        while True:
            try:
                message = channels.receive(channel)
            except OSError:
                message = None
            if message is None:
                self.ready.clear()
                return
            text, sock = message
            if text == channels.READY:
                self.ready.set()
            elif text == channels.WAKE:
                self.pool.on_wake()
            elif text.startswith("door?"):
                holder, _, name = text[len("door?"):].partition("?")
                self.pool.ask_for_door(self, holder, name)
            elif text.startswith("door!"):
                requester, _, name = text[len("door!"):].partition("?")
                self.pool.pass_door(requester, name, sock)
            elif text.startswith("visitor!") and sock is not None:
                requester, _, name = text[len("visitor!"):].partition("?")
                self.pool.pass_door(requester, name, sock, kind="visitor")
            elif sock is not None:
                sock.close()  # nothing else comes with a descriptor

    def send(self, text, sock=None, wait=True):
        """Send to this worker; False when it cannot take it (not running; with ``wait``
        False, also while it does not read its channel)."""
        if not self.ready.is_set():
            return False
        try:
            channels.send(self.channel, text, sock, wait)
        except BlockingIOError:  # a burst (a restart storm), or a stuck worker
            if time.monotonic() - self._full_logged > FULL_LOG_INTERVAL:
                self._full_logged = time.monotonic()
                log.warning("worker %d does not keep up with its channel: connections go "
                            "to the others meanwhile", self.index)
            return False
        except OSError as exc:
            log.warning("worker %d did not take %s: %s", self.index, text, exc)
            self.ready.clear()
            return False
        return True

    def pass_on(self, sock, kind):
        # never waits: a worker that stopped reading must not stall every accept
        return self.send(kind, sock, wait=False)

    def signal(self, signum):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except OSError:
                pass

    def wait(self, timeout):
        if self._loop is not None:
            self._loop.join(timeout)
        if self.proc is not None and self.proc.poll() is None:
            log.warning("worker %d did not stop within %.0f s: killing it", self.index, timeout)
            self.proc.kill()
            self.proc.wait()


class WorkerPool:
    def __init__(self, cfg, agent_address, rundir, on_wake, log_level=None):
        self.cfg = cfg
        self.agent_address = agent_address  # what workers record as their address
        self.rundir = rundir  # 0700: the workers' HTTP sockets
        self.on_wake = on_wake  # () -> None: a worker committed a session change
        self.log_level = log_level
        self.stopping = False
        self.workers = [Worker(self, index) for index in range(cfg.workers)]
        self._next = 0
        self._accepting = []

    def gateway_ids(self):
        """The ids whose sessions and outbox rows are this master's (its own from runs with
        one process, and its workers')."""
        return (self.cfg.gateway_id,) + tuple(w.gateway_id for w in self.workers)

    def start(self, timeout):
        for worker in self.workers:
            worker.start()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if not worker.ready.wait(max(0.0, deadline - time.monotonic())):
                raise WorkersNotReady("worker %d not ready within %s s (see its log lines "
                                      "above)" % (worker.index, timeout))

    def accept(self, sock, kind):
        """Accept on ``sock`` and pass every connection on, in its own greenlet."""
        self._accepting.append(gevent.spawn(self._accept_loop, sock, kind))

    def _accept_loop(self, listener, kind):
        while True:
            try:
                sock, _address = listener.accept()
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                gevent.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            if not self._pass_on(sock, kind):
                gevent.spawn(self._pass_later, sock, kind)

    def _pass_on(self, sock, kind):
        """To the next ready worker after the last one given; our copy is closed."""
        count = len(self.workers)
        for step in range(count):
            worker = self.workers[(self._next + step) % count]
            if worker.pass_on(sock, kind):
                self._next = (worker.index + 1) % count
                sock.close()
                return True
        return False

    def _pass_later(self, sock, kind):
        """No worker ready (all restarting): wait a little rather than refuse."""
        deadline = time.monotonic() + PASS_WAIT
        while time.monotonic() < deadline and not self.stopping:
            gevent.sleep(0.1)
            if self._pass_on(sock, kind):
                return
        sock.close()  # the agent reconnects with its backoff

    def ask_for_door(self, requester, holder, name):
        """Worker ``requester`` wants the port of ``name`` that worker gateway ``holder``
        serves (diglett.gateway.siblings); no such worker: it binds its own."""
        giver = next((w for w in self.workers if w.gateway_id == holder), None)
        if giver is None or giver is requester or \
                not giver.send("give?%d?%s" % (requester.index, name)):
            requester.send("door:%s" % name)

    def pass_door(self, requester, name, sock, kind="door"):
        """A port (or a visitor it held) from the giving worker, on to ``requester``."""
        try:
            worker = self.workers[int(requester)]
        except (ValueError, IndexError):
            worker = None
        if worker is None or not worker.send("%s:%s" % (kind, name), sock):
            if sock is not None:
                log.error("subdomain=%s its %s could not be passed to worker %s: closed",
                          name, "port" if kind == "door" else kind, requester)
        if sock is not None:
            sock.close()  # the master's copy

    def signal_all(self, signum):
        for worker in self.workers:
            worker.signal(signum)

    def stop_accepting(self):
        gevent.killall(self._accepting)

    def stop(self):
        """SIGTERM every worker (each drains as one server does) and wait for them."""
        self.stopping = True
        self.stop_accepting()
        self.signal_all(signal.SIGTERM)
        timeout = self.cfg.drain_timeout + self.cfg.shutdown_timeout + STOP_MARGIN
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.wait(max(0.1, deadline - time.monotonic()))


def _describe_exit(code):
    if code is not None and code < 0:
        try:
            return "signal %s" % signal.Signals(-code).name
        except ValueError:
            return "signal %d" % -code
    return "code %s" % code
