"""Doors: a name's tunnel port, which outlives the sessions that serve it.

A Door owns the listening socket of one name and its accept loop. The session serving the
name is attached to it; visitors go to that session. When the session goes away for a
reason its agent comes back from (a dropped connection, a restart, silence), the door keeps
listening for ``hold_timeout`` seconds and holds new visitors, unread, until the next session
of the name attaches and serves them, or until the hold ends and they are reset. The session
that left stays published meanwhile (its end is reported when the next session takes over or
the hold ends), so the route in Traefik never flaps during a reconnect.

A newer session of the same key takes the door at once (make-before-break): the old one is
handed over, which reports its end, tells its agent (GOAWAY ``REPLACED``) and lets its open
streams finish for up to ``drain_timeout``.

A door also survives a server restart when the port came through the fd store
(diglett.handoff): the new run opens it holding for the session the last run left active,
and moves to another worker process when the key's next session lands there
(diglett.gateway.siblings).
"""

import collections
import logging
import time

import gevent

from diglett import handoff
from diglett.reasons import CloseReason
from diglett.sockets import close_with_rst

log = logging.getLogger(__name__)

# Why a session may end with its door held open: its agent is expected back soon.
HOLD_REASONS = frozenset({CloseReason.AGENT_LEFT, CloseReason.DEAD, CloseReason.ERROR})
ACCEPT_ERROR_PAUSE = 0.1  # seconds after a failed accept (EMFILE): keep the port, do not spin


class HoldCounters:
    """What holds did, across doors, for /metrics."""

    def __init__(self):
        self.held = 0  # visitors that waited for a session
        self.served = 0  # of those, handed to the next session
        self.expired = 0  # reset when the hold ended with no session
        self.overflow = 0  # reset at once: hold_max_visitors reached
        self.holds = 0  # holds started (a session left and its door kept listening)
        self.resumed = 0  # holds ended by a new session


class Inherited:
    """A session the last server run left active, its port passed on: it counts as a
    session that left, reported ended when the next one takes the door or the hold ends."""

    def __init__(self, row, events):
        self.row = row
        self.events = events
        self.session_id = row.id

    def report_end(self, reason, traffic):
        self.events.ended(self.row, reason, traffic)


class Door:
    def __init__(self, name, listener, server):
        self.name = name
        self.listener = listener
        self.server = server
        self.host, self.port = listener.getsockname()[:2]
        self.session = None  # the AgentSession serving visitors now
        self.left = None  # (session, reason, traffic): gone, its end not reported yet
        self.visitors = collections.deque()  # (socket, address) held while no session serves
        self.closed = False
        self.moved = False  # given to another worker: its session ends when replaced there
        self.moved_at = None  # monotonic time it was given
        self._expiry = None
        self._accept = gevent.spawn(self._accept_loop)

    # ----- sessions -------------------------------------------------------------------
    def attach(self, session):
        """``session`` serves the door from now on. Called after its start is queued, so the
        end of the session it follows (held, or live and handed over) is reported after it."""
        previous, self.session = self.session, session
        if self._expiry is not None:
            self._expiry.kill()
            self._expiry = None
        if self.left is not None:
            gone, reason, traffic = self.left
            self.left = None
            self.server.hold_counters.resumed += 1
            log.info("subdomain=%s hold ended: session %s serves the port again (%d visitors "
                     "waited)", self.name, session.session_id, len(self.visitors))
            gone.report_end(reason, traffic)
        if previous is not None:
            previous.hand_over()
        while self.visitors and self.session is session:
            client, address = self.visitors.popleft()
            self.server.hold_counters.served += 1
            session.take(client, address)

    def leave(self, session, reason, traffic):
        """``session``'s tunnel ended. Its end is reported now, or when the hold is over."""
        if self.session is not session:
            return  # handed over earlier: its end is reported already
        self.session = None
        hold = self.server.config.hold_timeout
        if self.closed or reason not in HOLD_REASONS or not hold:
            session.report_end(reason, traffic)
            self.close()
            return
        self.hold_for(session, reason, traffic)

    def hold_for(self, session, reason, traffic):
        """Hold visitors for ``session``'s name, whose end waits for the next session."""
        hold = self.server.config.hold_timeout
        self.left = (session, reason, traffic)
        self.server.hold_counters.holds += 1
        log.info("subdomain=%s holding tunnel port %s:%d for %g s (session %s ended: %s)",
                 self.name, self.host, self.port, hold, session.session_id, reason)
        self._expiry = gevent.spawn_later(hold, self._hold_over)

    def _hold_over(self):
        self._expiry = None
        if self.session is not None:
            return
        log.info("subdomain=%s hold of %g s over with no session: closing port %d, "
                 "resetting %d waiting visitors", self.name, self.server.config.hold_timeout,
                 self.port, len(self.visitors))
        self.close()

    def close(self, forget=True):
        """Stop listening, reset held visitors, report a held session's end; idempotent.
        ``forget=False`` (a stop that hands the ports on) leaves the port in the fd store."""
        if self.closed:
            return
        self.closed = True
        if forget:
            self.server.fdstore.remove(handoff.door_name(self.name))
        if self._expiry is not None and self._expiry is not gevent.getcurrent():
            self._expiry.kill()
        self._accept.kill()
        self.listener.close()
        while self.visitors:
            client, _ = self.visitors.popleft()
            self.server.hold_counters.expired += 1
            close_with_rst(client)
        if self.left is not None:
            gone, reason, traffic = self.left
            self.left = None
            gone.report_end(reason, traffic)
        if self.server.doors.get(self.name) is self:
            del self.server.doors[self.name]

    def give_away(self):
        """Stop accepting; return (listening socket, held visitors, the left session's
        (session, reason, traffic) or None), for another worker to serve
        (diglett.gateway.siblings). A live session keeps its open streams; the caller
        reports a left one's end, and closes this process's copies once they are sent."""
        self.closed = self.moved = True
        self.moved_at = time.monotonic()
        self._accept.kill()
        if self._expiry is not None:
            self._expiry.kill()
            self._expiry = None
        visitors = list(self.visitors)
        self.visitors.clear()
        left, self.left = self.left, None
        if self.server.doors.get(self.name) is self:
            del self.server.doors[self.name]
        return self.listener, visitors, left

    def moved_in(self, gone, visitors, wait):
        """This door came from another worker for the session being admitted: hold its
        visitors, and those who come before that session attaches, for up to ``wait`` s."""
        self.left = (gone, CloseReason.REPLACED, "")
        self.visitors.extend(visitors)
        self._expiry = gevent.spawn_later(wait, self._hold_over)

    # ----- visitors -------------------------------------------------------------------
    def _accept_loop(self):
        while True:
            try:
                client, address = self.listener.accept()
            except OSError as exc:
                log.warning("subdomain=%s accept failed: %s", self.name, exc)
                gevent.sleep(ACCEPT_ERROR_PAUSE)
                continue
            session = self.session
            if session is not None and session.take(client, address):
                continue
            self._hold(client, address)

    def _hold(self, client, address):
        counters = self.server.hold_counters
        if (self.left is None and self.session is None) or self.closed:
            close_with_rst(client)  # nothing to wait for (the session is ending for good)
            return
        if len(self.visitors) >= self.server.config.hold_max_visitors:
            counters.overflow += 1
            log.warning("subdomain=%s hold_max_visitors (%d) reached: resetting %s:%d",
                        self.name, self.server.config.hold_max_visitors, *address[:2])
            close_with_rst(client)
            return
        counters.held += 1
        self.visitors.append((client, address))

    def waiting(self):
        return len(self.visitors)
