"""Registry rows and keys for in-process tests: fixed keys, a session row with defaults, and
a database worker stand-in that runs each call inline (no thread)."""

import coincurve

from diglett import crypto, registry
from diglett.registry import SessionRow


def make_key(seed):
    return coincurve.PrivateKey(bytes([seed]) * 32)


K1, K2 = (crypto.public_hex(make_key(seed)) for seed in (1, 2))


def session(id_="a1b2c3d4e5f60718", subdomain="foo", key=K1, port=30001, started=1000.0,
            instance="server-1", gateway=registry.LEGACY_GATEWAY):
    return SessionRow(id_, subdomain, key, "127.0.0.1", port, "192.0.2.7:51000", started,
                      None, registry.STATE_ACTIVE, None, instance, gateway)


class InlineDb:
    """diglett.dbworker.DatabaseWorker's ``call``, run in the caller: tests need no thread."""

    def call(self, function, *args):
        return function(*args)
