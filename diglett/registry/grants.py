"""Grants: which agent key may serve which subdomain (and on which pinned port).

This module owns the grant API (grant, revoke, list, look up, the snapshot the server polls)
and the checks on what an operator may store. It must not decide admission: the gateway
decides from the snapshot.
"""

import json
import logging
import time

from diglett import crypto, names
from diglett.policy import OPTION_NAMES, Policy
from diglett.registry.changes import GRANTS
from diglett.registry.records import Grant, RegistryError, default_actor

log = logging.getLogger(__name__)
POLICY_FIELDS = frozenset(OPTION_NAMES.values())  # every field of a Policy

MAX_COMMENT_LEN = 200  # characters in a grant comment; one line in `diglett-admin grants`
PORT_RANGE = (1, 65535)


class GrantTable:
    """Mixed into ``Registry``: uses ``self._grants``, ``_call``, ``_write``, ``_log`` and, for
    the snapshot cache, ``db``, ``_is_sqlite``, ``_writes`` (bumped after each own commit) and
    the thread-local ``_local``.

    The underscore methods run inside ``_call``, which retries and translates errors.
    """

    def grant(self, subdomain, key, port=None, comment="", actor=None, changes=None, clear=()):
        """Create or update the grant (subdomain, key); returns it.

        ``changes`` ({Policy field: value}) and ``clear`` (fields to empty) edit its policy;
        the options not named keep their value on an existing grant.
        """
        subdomain = names.validate_subdomain(subdomain)
        key = crypto.normalize_public_key(key)
        check_port(port)
        check_comment(comment)
        Policy().updated(changes, clear)  # refuse bad input before touching the database
        actor = actor or default_actor()
        return self._call(self._grant, subdomain, key, port, comment or "", actor,
                          changes, tuple(clear))

    def _grant(self, subdomain, key, port, comment, actor, changes=None, clear=()):
        model = self._grants
        this = (model.subdomain == subdomain) & (model.key == key)
        with self._write():
            if port is not None:
                holder = model.get_or_none((model.port == port) & ~this)
                if holder is not None:
                    raise RegistryError(
                        "port %d is already pinned to %s (key %s); choose another port "
                        "or revoke that grant first"
                        % (port, holder.subdomain, crypto.fingerprint(holder.key))
                    )
            row = model.get_or_none(this)
            policy = _policy_of(row).updated(changes, clear)
            self._check_aliases_free(subdomain, policy)
            if row is None:
                action = "grant"
                row = model.create(
                    subdomain=subdomain, key=key, port=port, comment=comment, created=time.time(),
                    policy=_policy_text(policy),
                )
            else:
                action = "regrant"
                row.port, row.comment, row.policy = port, comment, _policy_text(policy)
                row.save()
            self._log(actor, action, subdomain, key, "port=%s comment=%r policy=%s"
                      % (port, comment, policy.summary()))
        self._writes += 1
        return _grant_of(row)

    def set_policy(self, subdomain, key=None, changes=None, clear=(), actor=None):
        """Edit the policy of ``subdomain``'s grants (of ``key`` only, if given), keeping
        their keys, ports and comments; returns the updated grants (none: no such grant)."""
        subdomain = names.validate_subdomain(subdomain)
        if key is not None:
            key = crypto.normalize_public_key(key)
        Policy().updated(changes, clear)
        return self._call(self._set_policy, subdomain, key, changes, tuple(clear),
                          actor or default_actor())

    def _set_policy(self, subdomain, key, changes, clear, actor):
        model = self._grants
        where = model.subdomain == subdomain
        if key is not None:
            where &= model.key == key
        updated = []
        with self._write():
            for row in model.select().where(where).order_by(model.key):
                # --clear all starts afresh: the way out of a row that fails its checks
                start = Policy() if set(clear) >= POLICY_FIELDS else _policy_of(row)
                policy = start.updated(changes, clear)
                self._check_aliases_free(subdomain, policy)
                row.policy = _policy_text(policy)
                row.save()
                self._log(actor, "policy", subdomain, row.key, policy.summary())
                updated.append(_grant_of(row))
        self._writes += 1
        return updated

    def _check_aliases_free(self, subdomain, policy):
        """An alias routes to one name only: refuse one another name's grant holds."""
        if not policy.aliases:
            return
        model = self._grants
        for row in model.select().where(model.subdomain != subdomain):
            taken = set(policy.aliases) & set(_policy_of(row).aliases)
            if taken:
                raise RegistryError("alias %s already routes to %s; remove it there first"
                                    % (", ".join(sorted(taken)), row.subdomain))

    def revoke(self, subdomain, key=None, actor=None):
        """Remove the grant of ``subdomain`` to ``key`` (or to every key); returns how many."""
        subdomain = names.validate_subdomain(subdomain)
        if key is not None:
            key = crypto.normalize_public_key(key)
        return self._call(self._revoke, subdomain, key, actor or default_actor())

    def _revoke(self, subdomain, key, actor):
        model = self._grants
        where = model.subdomain == subdomain
        if key is not None:
            where &= model.key == key
        with self._write():
            count = model.delete().where(where).execute()
            if count:
                self._log(actor, "revoke", subdomain, key, "removed=%d" % count)
        self._writes += 1
        return count

    def grants(self):
        model = self._grants
        query = model.select().order_by(model.subdomain, model.key)
        return self._call(lambda: [g for g in map(_grant_of, query) if g is not None])

    def find_grant(self, subdomain, key):
        subdomain = names.validate_subdomain(subdomain)
        key = crypto.normalize_public_key(key)
        model = self._grants
        where = (model.subdomain == subdomain) & (model.key == key)
        row = self._call(lambda: model.get_or_none(where))
        return None if row is None else _grant_of(row)

    def grant_snapshot(self):
        """{(subdomain, key): Grant} of every grant; cheap enough to call every second.

        The grants' change counter (diglett.registry.changes) tells whether anyone wrote a
        grant since the last call; if not, the cached snapshot is returned. A database
        without the counters falls back, with SQLite, to ``PRAGMA data_version`` (whether
        another connection committed) and to our own writes.
        """
        return dict(self._call(self._snapshot))

    def _snapshot(self):
        cache = getattr(self._local, "snapshot", None)
        stamp = self._stamp()
        if cache is not None and stamp is not None and cache[0] == stamp:
            return cache[1]
        grants = {(g.subdomain, g.key): g for g in map(_grant_of, self._grants.select())
                  if g is not None}
        self._local.snapshot = (stamp, grants)
        return grants

    def _stamp(self):
        """What changes whenever the grants may have changed; None when unknown."""
        version = self._version_of(GRANTS)
        if version is not None:
            return ("changes", version)
        if not self._is_sqlite:
            return None
        # data_version is per connection: a new connection (after close()) may restart its
        # count, so the connection itself is part of the stamp.
        connection = self.db.connection()
        data_version = connection.execute("PRAGMA data_version").fetchone()[0]
        return (connection, data_version, self._writes)


def check_port(port):
    if port is None:
        return
    low, high = PORT_RANGE
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= high:
        raise RegistryError("port must be a number from %d to %d, got %r" % (*PORT_RANGE, port))


def check_comment(comment):
    if comment is None:
        return
    if len(comment) > MAX_COMMENT_LEN or not comment.isprintable():
        raise RegistryError(
            "comment must be one line of at most %d printable characters" % MAX_COMMENT_LEN
        )


def _policy_text(policy):
    return json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":"))


def _policy_of(row):
    """The row's policy, checked again; a row that fails (edited by hand) raises."""
    if row is None:
        return Policy()
    try:
        return Policy.from_json(json.loads(row.policy or "{}"))
    except (ValueError, TypeError) as exc:  # PolicyError is a ValueError, as is bad JSON
        raise RegistryError("the policy stored for %s is invalid (%s); start it afresh with "
                            "diglett-admin set %s --clear all" % (row.subdomain, exc,
                                                                  row.subdomain)) from None


def _grant_of(row):
    """A grant whose stored policy fails its checks fails closed: the server refuses the
    key (a route without its basic auth or allow list must never be published)."""
    try:
        policy = _policy_of(row)
    except RegistryError as exc:
        log.error("%s; ignoring the grant of %s to key %s", exc, row.subdomain,
                  crypto.fingerprint(row.key))
        return None
    return Grant(row.subdomain, row.key, row.port, row.comment, row.created, policy)
