"""Test plan D (faults), the parts the older tests leave open, end to end on loopback.

The registry on a small tmpfs that turns read-only or fills up under a running server (the
tunnels stay up, the server says what is wrong once, and catches up when the disk is back),
and backends that hang or come up late. Mounting needs root (CAP_SYS_ADMIN); without it the
registry tests skip and say so.
"""

import os
import shutil
import socket
import subprocess
import threading
import tempfile
import time
from pathlib import Path

import pytest

from tests import harness
from tests.harness import Backend, Gateway, connect, echo, wait_until


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for this test; skips when mounting is not permitted."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    result = run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "diglett-test",
                 str(mountpoint))
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): %s" % result.stderr.strip())
    yield mountpoint
    for _ in range(20):  # the server may still hold files open for a moment
        if run("umount", str(mountpoint)).returncode == 0:
            break
        time.sleep(0.25)
    else:
        run("umount", "-l", str(mountpoint))


def fill_up(mountpoint):
    filler = mountpoint / "filler"
    with open(filler, "wb") as out:
        block = bytes(65536)
        try:
            while True:
                out.write(block)
                out.flush()
        except OSError:
            pass
    return lambda: filler.unlink()


def probe_echo(port, seconds):
    """Echo round trips for ``seconds``; returns (round trips, failures)."""
    done, failures = 0, []
    deadline = time.monotonic() + seconds
    with connect(port, timeout=10) as sock:
        while time.monotonic() < deadline:
            try:
                harness.round_trips(sock, 1)
                done += 1
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
                break
            time.sleep(0.01)
    return done, failures


NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups"]


class NobodyGateway(Gateway):
    """A Gateway whose server and diglett-admin run as user nobody (root ignores file modes)."""

    def start(self, timeout=15):
        self.proc = harness.Proc(AS_NOBODY + harness.command("diglett-server") +
                                 ["-c", str(self.config_path)], self.workdir, "server")
        match = self.proc.wait_for(harness.READY, timeout)
        self.agent_address = (match.group(1), int(match.group(2)))
        self.http_address = (match.group(3), int(match.group(4)))
        self.key = match.group(5)
        return self

    def admin(self, *args, check=True, timeout=30):
        result = subprocess.run(AS_NOBODY + harness.command("diglett-admin") +
                                ["-c", str(self.config_path), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError("diglett-admin %s failed: %s" % (args, result.stderr))
        return result


@pytest.fixture
def nobody_folder():
    """A folder under /tmp that user nobody can use (pytest's tmp_path is private to root)."""
    if run("setpriv", "--reuid=%d" % NOBODY, "true").returncode != 0:
        pytest.skip("cannot run a process as user nobody here")
    folder = Path(tempfile.mkdtemp(prefix="diglett-plan-"))
    os.chmod(folder, 0o755)
    os.chown(folder, NOBODY, NOBODY)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_read_only(folder):
    """chmod 0444 the database and its WAL files (plan D6 b)."""
    files = [folder / name for name in ("registry.db", "registry.db-wal", "registry.db-shm")]
    for path in files:
        if path.exists():
            path.chmod(0o444)
    return lambda: [path.chmod(0o644) for path in files if path.exists()]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_registry_read_only_or_full_keeps_tunnels_up_and_says_so(tmp_path, request,
                                                                  echo_backend, fault):
    if fault == "full":
        disk = request.getfixturevalue("small_disk")
        gateway = Gateway(tmp_path / "gw", database=disk / "registry.db").start()
        database = disk / "registry.db"
    else:
        folder = request.getfixturevalue("nobody_folder")
        gateway = NobodyGateway(folder / "gw")
        os.chown(gateway.workdir, NOBODY, NOBODY)
        gateway.start()
        database = gateway.workdir / "registry.db"
    foo = gateway.agent("foo", echo_backend.address)
    bar_key, bar_public = gateway.new_key("bar")
    gateway.grant("bar", bar_public)
    wait_until(lambda: len(gateway.sessions()) == 1, 5, what="foo's session row")
    time.sleep(1.2)  # the grant poll has seen bar

    restore = make_read_only(gateway.workdir) if fault == "read-only" else fill_up(disk)
    result = {}
    prober = threading.Thread(target=lambda: result.update(zip(("done", "failures"),
                                                                probe_echo(foo.port, 4))))
    prober.start()
    bar = gateway.agent("bar", echo_backend.address, key_file=bar_key, wait=False)
    bar.wait_up(timeout=15)  # OK does not wait for the session row
    with connect(bar.port, timeout=5) as sock:
        harness.round_trips(sock, 3)
    prober.join(10)
    assert not result["failures"] and result["done"] > 50, result
    foo.stop()  # an end to record too
    admin = gateway.admin("grant", "baz", "--key", bar_public, check=False)
    assert admin.returncode != 0 and "Traceback" not in admin.stderr
    assert str(database) in admin.stderr, admin.stderr
    log = gateway.proc.stderr()
    assert "Traceback" not in log
    if fault == "read-only":
        # The server's open database handle still writes (file modes are checked at open):
        # nothing is wrong for it, and the rows keep coming. Only new openers are refused.
        assert "read-only" in admin.stderr or "readonly" in admin.stderr, admin.stderr
        wait_until(lambda: [r["subdomain"] for r in gateway.sessions()] == ["bar"], 10,
                   interval=0.3, what="bar's row, and foo's ended, written meanwhile")
        assert gateway.http_get("/healthz")["status"] == "ok"
        restore()
        return
    health = wait_until(lambda: (lambda h: h["status"] == "degraded" and h)(
        gateway.http_get("/healthz")), 10, interval=0.2, what="/healthz to say degraded")
    print("%s registry: /healthz %s" % (fault, health))
    complaints = [line for line in gateway.proc.stderr().splitlines()
                  if "registry write failed" in line]
    assert len(complaints) == 1, "one line per condition, not one per retry:\n" + "\n".join(
        complaints)
    assert "full" in complaints[0].lower(), complaints[0]
    assert "full" in health["registry"].lower(), health

    restore()
    wait_until(lambda: gateway.http_get("/healthz")["status"] == "ok", 15, interval=0.2,
               what="/healthz ok once the disk is back")
    assert "registry writes work again" in gateway.proc.stderr()
    rows = wait_until(lambda: (lambda s: [r["subdomain"] for r in s] == ["bar"] and s)(
        gateway.sessions()), 10, interval=0.3, what="bar's row, and foo's ended")
    assert rows[0]["port"] == bar.port
    assert bar.popen.poll() is None


# ----- D3: backends that hang, or come up late ---------------------------------------------
@pytest.mark.timeout(40)
def test_hanging_backend_is_reclaimed_at_the_idle_timeout_and_others_flow(tmp_path):
    release = threading.Event()
    backend = Backend(harness.by_first_byte({b"H": harness.stall(release), b"E": echo}))
    try:
        gateway = Gateway(tmp_path / "gw", stream_idle_timeout=2).start()
        agent = gateway.agent("foo", backend.address)
        hung = connect(agent.port)
        hung.sendall(b"H")
        busy = connect(agent.port)
        busy.sendall(b"E")
        started = time.monotonic()
        while time.monotonic() - started < 4:  # the busy stream keeps moving meanwhile
            harness.round_trips(busy, 1)
            time.sleep(0.2)
        hung.settimeout(5)
        with pytest.raises(ConnectionResetError):  # reclaimed with a reset, not an EOF
            hung.recv(1)
        harness.round_trips(busy, 5)
        wait_until(lambda: gateway.http_get("/debug/stats")["streams"] == 1, 5,
                   what="only the busy stream left")
        hung.close()
        busy.close()
    finally:
        release.set()
        backend.close()


@pytest.mark.timeout(40)
def test_backend_that_accepts_late_gets_the_clients_early_bytes(gateway):
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)  # the kernel queues connects
    received = {}

    def accept_late():
        time.sleep(3)
        sock, _ = listener.accept()
        with sock:
            data = harness.recv_exact(sock, 100000)
            received["data"] = data
            sock.sendall(b"got it")
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=accept_late, daemon=True).start()
    try:
        agent = gateway.agent("late", listener.getsockname()[:2])
        payload = os.urandom(100000)
        with connect(agent.port, timeout=10) as client:
            client.sendall(payload)  # before the backend accepts: buffered within the window
            client.settimeout(10)
            assert harness.recv_exact(client, 6) == b"got it"
            assert client.recv(1) == b""
        assert received["data"] == payload
    finally:
        listener.close()
    assert "CONNECT_FAILED" not in agent.stderr()


