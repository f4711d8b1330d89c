"""Kicks: `diglett-admin kick` requests, which the running server polls and answers.

This module owns the request, the queue of unanswered ones per gateway and the answer. It must
not end a session itself: only the gateway holding it can, and it answers here.
"""

import time

from diglett import names
from diglett.registry.records import STATE_ACTIVE, default_actor


class KickTable:
    """Mixed into ``Registry``: uses ``self._kicks``, ``_sessions`` (who holds the name),
    ``_call``, ``_write``, ``_write_query`` and ``_log``."""

    def request_kick(self, subdomain, delay, actor=None):
        """Ask the running server to end the session of ``subdomain``; returns the request id.

        The request is addressed to the gateway holding the session, or to any when none does.
        """
        subdomain = names.validate_subdomain(subdomain)
        actor = actor or default_actor()
        model = self._sessions

        def insert():
            with self._write():
                holder = (model.select(model.gateway)
                          .where((model.subdomain == subdomain) & (model.state == STATE_ACTIVE))
                          .order_by(model.started.desc()).limit(1).scalar())
                row = self._kicks.create(subdomain=subdomain, delay=int(delay), actor=actor,
                                         requested=time.time(), gateway=holder)
                self._log(actor, "kick-request", subdomain, None, "delay=%d" % delay)
            return row.id

        return self._call(insert)

    def pending_kicks(self, gateway=None):
        """Unanswered kicks: every one, or those for ``gateway`` and those for any gateway."""
        model = self._kicks
        where = model.handled.is_null()
        if gateway is not None:
            where &= (model.gateway == gateway) | model.gateway.is_null()
        query = model.select().where(where).order_by(model.id)
        return self._call(lambda: [(row.id, row.subdomain, row.delay, row.actor) for row in query])

    def kick_handled(self, kick_id, result):
        """Answer a kick; the first answer wins when several gateways saw it."""
        model = self._kicks
        query = model.update(handled=time.time(), result=result).where(
            (model.id == kick_id) & model.handled.is_null())
        self._call(self._write_query, query)

    def kick_result(self, kick_id):
        """The server's answer to a kick request, or None while it is pending."""
        row = self._call(lambda: self._kicks.get_or_none(self._kicks.id == kick_id))
        return None if row is None or row.handled is None else row.result

    def cancel_kick(self, kick_id):
        query = self._kicks.delete().where((self._kicks.id == kick_id)
                                           & self._kicks.handled.is_null())
        return self._call(self._write_query, query)
