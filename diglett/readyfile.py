"""The ready file: what a started diglett-server tells scripts, as JSON instead of a log line.

``diglett-server --ready-file PATH`` writes PATH once every listener is bound, atomically (a
reader sees the whole file or none), and removes it on a clean stop. A script, the demo, the
benchmarks and the tests wait for it with ``wait()`` instead of matching log text:

    {"version": "0.9.0", "pid": 4242, "agents": {"host": "127.0.0.1", "port": 20000},
     "http": {"host": "127.0.0.1", "port": 8000}, "domain": "example.com",
     "key": "02...66 hex digits", "cipher": "chacha20-poly1305", "gateway": "gw1"}

Fields are only ever added, never renamed (docs/operations.md, "Scripts and the ready file").
"""

import json
import os
import time

POLL = 0.05  # seconds between looks at a file that is not there yet


class NotReady(Exception):
    """The server exited, or the file did not appear in time; the message says which."""


def info(version, agents, http, domain, key, cipher, gateway):
    """The ready file's content: ``agents`` and ``http`` are (host, port, ...) addresses."""
    return {
        "version": version,
        "pid": os.getpid(),
        "agents": {"host": agents[0], "port": agents[1]},
        "http": {"host": http[0], "port": http[1]},
        "domain": domain,
        "key": key,
        "cipher": cipher,
        "gateway": gateway,
    }


def write(path, content):
    """Replace ``path`` with ``content`` in one rename, so no reader sees half a file."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(content, out, sort_keys=True)
        out.write("\n")
    os.replace(temporary, path)


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def wait(path, timeout, exited=lambda: None):
    """The ready file's content once it exists. ``exited``: () -> the server's exit status, or
    None while it runs; a server that exits first raises NotReady at once, not at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="utf-8") as found:
                return json.load(found)
        except FileNotFoundError:
            pass
        status = exited()
        if status is not None:
            raise NotReady("diglett-server exited with status %s before it was ready" % status)
        if time.monotonic() > deadline:
            raise NotReady("diglett-server wrote no ready file %s within %g s" % (path, timeout))
        time.sleep(POLL)
