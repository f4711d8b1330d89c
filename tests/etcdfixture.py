"""A private etcd for the tests: the real server from Debian's etcd-server, on loopback.

Each test gets its own member, data folder and free ports; it is stopped by its PID. A
restart keeps the data folder and the ports, as an operator's restart would. Tests are
skipped only when no etcd binary is installed (scripts/bootstrap --test installs it).
"""

import json
import shutil
import urllib.request

import pytest

from tests import harness

START_TIMEOUT = 20  # seconds for etcd to answer its health check


class Etcd:
    def __init__(self, workdir):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_port = harness.free_port()
        self.peer_port = harness.free_port()
        self.proc = None
        self.starts = 0

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.client_port

    def start(self):
        self.starts += 1
        client, peer = self.url, "http://127.0.0.1:%d" % self.peer_port
        argv = [shutil.which("etcd"), "--name", "test", "--data-dir", str(self.workdir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "test=" + peer, "--log-level", "warn"]
        self.proc = harness.Proc(argv, self.workdir, "etcd-%d" % self.starts)
        harness.wait_until(self._healthy, START_TIMEOUT, interval=0.1, what="etcd health")
        return self

    def _healthy(self):
        if self.proc.popen.poll() is not None:
            raise AssertionError("etcd exited with %s:\n%s" % (self.proc.popen.returncode,
                                                               self.proc.stderr()[-3000:]))
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                return json.loads(answer.read()).get("health") == "true"
        except OSError:
            return False

    def kill(self):
        self.proc.kill()

    def restart(self):
        self.kill()
        return self.start()


@pytest.fixture
def etcd_server(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("no etcd binary (scripts/bootstrap --test installs Debian's etcd-server)")
    return Etcd(tmp_path / "etcd").start()
