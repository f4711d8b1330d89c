"""A private PostgreSQL cluster for the tests: started once per test session, on loopback.

The cluster lives in a temporary folder, listens on 127.0.0.1 at a free port with trust
authentication, and is stopped by pg_ctl (then by its PID) when the session ends. initdb
refuses to run as root, so as root the cluster belongs to the ``postgres`` user. Each test
gets its own empty database (``postgres.new_database()``). Tests are skipped only when no
PostgreSQL server binaries are installed (scripts/bootstrap --test installs them).
"""

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest

from tests.support import harness

START_TIMEOUT = 30  # seconds for initdb plus the server's start
STOP_TIMEOUT = 10  # seconds pg_ctl may take to stop it before the postmaster is killed
SUPERUSER = "postgres"
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def server_binaries():
    """The newest /usr/lib/postgresql/N/bin holding initdb, or None."""
    found = [path for path in glob.glob("/usr/lib/postgresql/*/bin")
             if os.path.exists(os.path.join(path, "initdb"))]
    found.sort(key=lambda path: [int(n) for n in re.findall(r"\d+", path)])
    return found[-1] if found else None


class Cluster:
    def __init__(self, bindir):
        self.bindir = bindir
        self.folder = tempfile.mkdtemp(prefix="diglett-pg-")
        self.data = os.path.join(self.folder, "data")
        self.log = os.path.join(self.folder, "server.log")
        self.port = None
        self._as_user = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as_user = "postgres"
        os.chmod(self.folder, 0o700)

    def _run(self, *argv, timeout=START_TIMEOUT):
        argv = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self._as_user:
            argv = ["runuser", "-u", self._as_user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd="/")

    def start(self):
        done = self._run("initdb", "-D", self.data, "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                         "--no-sync")
        if done.returncode != 0:
            raise RuntimeError("initdb failed: %s%s" % (done.stdout, done.stderr))
        for _ in range(3):  # a free port may be taken before the server binds it
            self.port = harness.free_port()
            options = "-c listen_addresses=127.0.0.1 -p %d -k %s %s" % (
                self.port, self.folder, SERVER_OPTIONS)
            done = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w",
                             "-t", str(START_TIMEOUT), "-o", options, "start")
            if done.returncode == 0:
                return self
        raise RuntimeError("PostgreSQL did not start: %s%s\n%s" % (
            done.stdout, done.stderr, self._log_tail()))

    def _log_tail(self):
        try:
            with open(self.log) as log:
                return log.read()[-3000:]
        except OSError:
            return ""

    def stop(self):
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop",
                      timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        pid = self._postmaster_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def _postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as pidfile:
                return int(pidfile.readline())
        except (OSError, ValueError):
            return None

    def url(self, database):
        return "postgresql://%s@127.0.0.1:%d/%s" % (SUPERUSER, self.port, database)

    def connect(self, database="postgres"):
        """A psycopg2 connection in autocommit mode (the test's own, not diglett's)."""
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER,
                                      dbname=database, connect_timeout=5)
        connection.autocommit = True
        return connection

    def new_database(self):
        """The URL of a new, empty database."""
        name = "t_%s" % uuid.uuid4().hex[:12]
        connection = self.connect()  # not `with connection`: that would open a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE %s" % name)
        finally:
            connection.close()
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster; skips when PostgreSQL is not installed."""
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin "
                    "(scripts/bootstrap --test installs Debian's postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2 is in the test extra: "
                        "pip install -e '.[test]'")
    started = time.monotonic()
    cluster = Cluster(bindir).start()
    print("PostgreSQL %s on 127.0.0.1:%d in %.1f s" % (bindir, cluster.port,
                                                      time.monotonic() - started))
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres):
    """A fresh database of the session's cluster, as a postgresql:// URL."""
    return postgres.new_database()
