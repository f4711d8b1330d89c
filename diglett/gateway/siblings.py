"""A name's tunnel port moving from one worker to another (diglett.workers), make-before-break.

When an agent's key reconnects to another worker while its old session still serves the
name, the new worker asks the master for the port (``door?GATEWAY?NAME``); the master asks
the holder (``give?I?NAME``), which stops accepting on it and sends the listening socket back
(SCM_RIGHTS, diglett.channel), and the master passes it on. The new session serves the same
port, so the route does not change and visitors in the kernel's backlog meanwhile are served
by the new worker; the old session keeps its open streams until the registry shows the new
one, then is handed over as on one server (GOAWAY REPLACED, drain_timeout for its streams:
fleet.RegistryPoller.check_takeovers). A port the grant pins can only move this way.

A door held for a session that left (hold_timeout: the agent dropped and came back on the
other worker) moves too, with the visitors it holds (each passed over before the port, so
all are there when it arrives); the left session's end is reported by its worker once the
registry shows the new session, so the route never disappears in between.
"""

import logging

import gevent
import gevent.event

from diglett import channel as channels

log = logging.getLogger(__name__)

DOOR_WAIT = 5.0  # seconds a new session waits for a sibling's port before binding its own
MOVED_HOLD = 10.0  # seconds a moved door holds visitors for a session that has not attached


class MovedIn:
    """The session a moved door was serving, as the new worker sees it: another worker's,
    which reports its end (so there is nothing to report here)."""

    session_id = "(another worker's)"

    def report_end(self, reason, traffic):
        pass


class Siblings:
    def __init__(self, server, channel):
        self.server = server  # gives doors away (Server.give_door)
        self.channel = channel
        self._waiting = {}  # subdomain -> AsyncResult of the port asked for
        self._visitors = {}  # subdomain -> held visitors that came ahead of its port

    def request(self, holder, name):
        """(listening socket, [(visitor, address)]) of ``name`` from worker gateway
        ``holder``, or None."""
        if name in self._waiting:
            return None  # another handshake of the same name asks already
        result = self._waiting[name] = gevent.event.AsyncResult()
        try:
            channels.send(self.channel, "door?%s?%s" % (holder, name))
            sock = result.get(timeout=DOOR_WAIT)
        except (OSError, gevent.Timeout):
            log.warning("subdomain=%s the port of gateway %s did not come within %s s: "
                        "binding one here", name, holder, DOOR_WAIT)
            sock = None
        finally:
            self._waiting.pop(name, None)
        visitors = self._visitors.pop(name, [])
        if sock is None:
            for visitor, _ in visitors:
                visitor.close()
            return None
        return sock, visitors

    def delivered(self, name, sock):
        """The master's answer: the port, or None (the holder kept it)."""
        waiting = self._waiting.get(name)
        if waiting is None:
            if sock is not None:
                log.warning("subdomain=%s its port came after the wait ended: closing it",
                            name)
                sock.close()
            return
        waiting.set(sock)

    def visitor(self, name, sock):
        """A visitor the holder held, sent ahead of the port."""
        try:
            address = sock.getpeername()
        except OSError:  # gave up meanwhile
            address = None
        if name not in self._waiting or address is None:
            sock.close()
            return
        self._visitors.setdefault(name, []).append((sock, address))

    def give(self, requester, name):
        """The master asks for ``name``'s port on behalf of worker ``requester``."""
        given = self.server.give_door(name)
        sock, visitors = given if given is not None else (None, [])
        try:
            for visitor, _ in visitors:
                channels.send(self.channel, "visitor!%s?%s" % (requester, name), visitor)
            channels.send(self.channel, "door!%s?%s" % (requester, name), sock)
        except OSError as exc:
            log.error("subdomain=%s cannot hand its port over: %s", name, exc)
        finally:
            for visitor, _ in visitors:
                visitor.close()  # ours; the copies travel
            if sock is not None:
                sock.close()
