"""Gateways: the servers sharing one registry, each refreshing its row every few seconds.

This module owns the heartbeat write and the listing with each gateway's active session
count. It must not judge liveness for anyone: the caller says how old a row may be
(``end_sessions_of_dead_gateways`` in sessions.py, called from diglett/gateway/events.py).
"""

import time

import peewee

from diglett.registry.records import STATE_ACTIVE, GatewayRow


class GatewayTable:
    """Mixed into ``Registry``: uses ``self._gateways``, ``_sessions``, ``_call`` and ``_write``.

    The underscore methods run inside ``_call``, which retries and translates errors.
    """

    def gateway_seen(self, gateway, instance, address):
        """Refresh ``gateway``'s row; returns the instance that held it before (None: new).

        Another instance there while this one runs means two servers share a gateway_id.
        """
        return self._call(self._gateway_seen, gateway, instance, address)

    def _gateway_seen(self, gateway, instance, address):
        model = self._gateways
        now = time.time()
        with self._write():
            row = model.get_or_none(model.gateway_id == gateway)
            if row is None:
                model.create(gateway_id=gateway, instance=instance, address=address,
                             started=now, last_seen=now)
                return None
            changes = {"instance": instance, "address": address, "last_seen": now}
            if row.instance != instance:
                changes["started"] = now
            model.update(**changes).where(model.gateway_id == gateway).execute()
        return row.instance

    def gateways(self):
        """Every gateway that ever used this registry, with its active session count."""
        seen, model = self._gateways, self._sessions
        counts = (model.select(model.gateway, peewee.fn.COUNT(model.id).alias("n"))
                  .where(model.state == STATE_ACTIVE).group_by(model.gateway))

        def select():
            held = {row.gateway: row.n for row in counts}
            return [GatewayRow(row.gateway_id, row.instance, row.address, row.started,
                               row.last_seen, held.get(row.gateway_id, 0))
                    for row in seen.select().order_by(seen.gateway_id)]

        return self._call(select)
