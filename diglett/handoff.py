"""Listening sockets that outlive the server process: systemd's file-descriptor store.

Under a unit with ``Type=notify`` and ``FileDescriptorStoreMax=``, the server gives systemd
a copy of its agent port and of every tunnel port as it opens them (``FDSTORE=1``, one name
each); systemd keeps them open while the server restarts and passes them to the next run
(``LISTEN_FDS``, ``LISTEN_FDNAMES``). The kernel keeps completing visitors' and agents'
handshakes into those sockets' backlogs meanwhile, so a restart or an upgrade delays them
by the gap instead of refusing them. Both halves are the documented sd_notify and
sd_listen_fds protocols (sd_notify(3), sd_listen_fds(3)), spoken over a datagram socket with
the descriptors as SCM_RIGHTS; nothing else of systemd is needed, so any supervisor that
speaks them (and the tests' stand-in) works the same.

Without ``NOTIFY_SOCKET`` every call here does nothing: a server run by hand is unchanged.
"""

import array
import logging
import os

from gevent import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here, in order
AGENTS = "agents"  # the name of the agent port in the store
DOOR_PREFIX = "door-"  # + subdomain: a tunnel port (no colon: LISTEN_FDNAMES splits on it)


def transport_name(kind):
    """The store's name of the listen_tls (``tls``) or listen_ws (``ws``) listener."""
    return "%s-%s" % (AGENTS, kind)


def door_name(subdomain):
    return DOOR_PREFIX + subdomain


class FdStore:
    """The supervisor's notify socket and what it handed us at start."""

    def __init__(self, environ=None):
        own = environ is None  # the process's own variables (not a test's dict)
        environ = os.environ if own else environ
        self.address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        # systemd (254+) sets FDSTORE to FileDescriptorStoreMax; older ones say nothing, and
        # a store that was not configured drops what we send, which costs nothing.
        self.enabled = self.address is not None and environ.get("FDSTORE", "1") != "0"
        self.inherited = _listen_fds(environ)  # name -> socket, passed by the last run
        for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            if own:
                os.environ.pop(variable, None)  # hook scripts are not to take them for theirs

    def take(self, name):
        """The inherited socket called ``name``, or None; each one is taken once."""
        return self.inherited.pop(name, None)

    def doors(self):
        """{subdomain: socket} of the tunnel ports the last run left in the store."""
        names = [name for name in self.inherited if name.startswith(DOOR_PREFIX)]
        return {name[len(DOOR_PREFIX):]: self.inherited.pop(name) for name in names}

    def close_unused(self):
        for name, sock in self.inherited.items():
            log.info("fd store: %s not used by this run; closing it", name)
            self.remove(name)
            sock.close()
        self.inherited.clear()

    def keep(self, sock, name, passed):
        """Store a listener that ``passed`` (the last run's socket of that name, or None) may
        have been: systemd keeps both of two descriptors stored under one name, so the last
        run's goes first when this run listens elsewhere."""
        if passed is not None and sock is not passed:
            self.remove(name)
        self.store(sock, name)

    def store(self, sock, name):
        if self.enabled:
            self.notify("FDSTORE=1\nFDNAME=%s" % name, fds=[sock.fileno()])

    def remove(self, name):
        if self.enabled:
            self.notify("FDSTOREREMOVE=1\nFDNAME=%s" % name)

    def notify(self, state, fds=()):
        """Send ``state`` to the supervisor; a lost message is logged, never fatal."""
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))] if fds else []
            try:
                sock.sendmsg([state.encode()], ancillary, 0, self.address)
            except OSError as exc:
                log.warning("sd_notify %s failed: %s", state.split("\n")[0], exc)


def _socket_address(value):
    if not value:
        return None
    if value.startswith("@"):  # an abstract socket
        return "\0" + value[1:]
    return value if value.startswith("/") else None


def _fd_bytes(fds):
    return array.array("i", fds).tobytes()


def _listen_fds(environ):
    """sd_listen_fds(3): the descriptors passed to this very process, by name."""
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        pid = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        return {}
    if count <= 0 or pid != os.getpid():
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    passed = {}
    for number in range(count):
        fd = LISTEN_FDS_START + number
        name = names[number] if number < len(names) and names[number] else "fd%d" % fd
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("fd store: passed descriptor %d (%s) is not a socket: %s", fd, name, exc)
            continue
        os.set_inheritable(fd, False)
        passed[name] = sock
    return passed
