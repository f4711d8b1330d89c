"""A name's tunnel port moving from one worker to another (diglett.workers), make-before-break.

When an agent's key reconnects to another worker while its old session still serves the
name, the new worker asks the master for the port (``door?GATEWAY?NAME``); the master asks
the holder (``give?I?NAME``), which stops accepting on it and sends the listening socket back
(SCM_RIGHTS, diglett.channel), and the master passes it on. The new session serves the same
port, so the route does not change and visitors in the kernel's backlog meanwhile are served
by the new worker; the old session keeps its open streams until the registry shows the new
one, then is handed over as on one server (GOAWAY REPLACED, drain_timeout for its streams:
fleet.RegistryPoller.check_takeovers). A port the grant pins can only move this way.

A door holding visitors for a session that left is not moved (its visitors are the holder's);
the new worker then binds a port of its own, as a gateway of a fleet does.
"""

import logging

import gevent
import gevent.event

from diglett import channel as channels

log = logging.getLogger(__name__)

DOOR_WAIT = 5.0  # seconds a new session waits for a sibling's port before binding its own


class Siblings:
    def __init__(self, server, channel):
        self.server = server  # gives doors away (Server.give_door)
        self.channel = channel
        self._waiting = {}  # subdomain -> AsyncResult of the port asked for

    def request(self, holder, name):
        """The listening socket of ``name`` from worker gateway ``holder``, or None."""
        if name in self._waiting:
            return None  # another handshake of the same name asks already
        result = self._waiting[name] = gevent.event.AsyncResult()
        try:
            channels.send(self.channel, "door?%s?%s" % (holder, name))
            return result.get(timeout=DOOR_WAIT)
        except (OSError, gevent.Timeout):
            log.warning("subdomain=%s the port of gateway %s did not come within %s s: "
                        "binding one here", name, holder, DOOR_WAIT)
            return None
        finally:
            self._waiting.pop(name, None)

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

    def give(self, requester, name):
        """The master asks for ``name``'s port on behalf of worker ``requester``."""
        sock = self.server.give_door(name)
        try:
            channels.send(self.channel, "door!%s?%s" % (requester, name), sock)
        except OSError as exc:
            log.error("subdomain=%s cannot hand its port over: %s", name, exc)
        finally:
            if sock is not None:
                sock.close()  # ours; the copy travels
