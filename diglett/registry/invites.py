"""Invites: one-time enrolment codes that become a grant bound to the key that redeems them.

This module owns creating an invite (a random id and secret, of which only the SHA-256 is
stored), listing and deleting invites, and redeeming one: checking the secret, the name, the
expiry and that it is unused, then marking it used and writing the grant, in one transaction,
so two agents racing with one code get one grant. It must not encode codes (diglett.invitecode)
or know the wire protocol.
"""

import hashlib
import hmac
import json
import secrets
import time

from diglett import crypto, names
from diglett.invitecode import INVITE_ID_SIZE, SECRET_SIZE
from diglett.policy import Policy
from diglett.registry.grants import check_comment, check_port
from diglett.registry.records import InviteRefused, InviteRow, RegistryError, default_actor

DEFAULT_TTL = 3600  # seconds an invite stays redeemable when --ttl is not given
MAX_TTL = 30 * 86400  # seconds: an invite is for onboarding now, not a standing credential


class InviteTable:
    """Mixed into ``Registry``: uses ``self._invites``, ``_grants``, ``_grant`` (the grant
    write, joined to the redemption's transaction), ``_call``, ``_write`` and ``_log``."""

    def create_invite(self, subdomain, ttl=DEFAULT_TTL, changes=None, port=None, comment="",
                      actor=None):
        """(InviteRow, secret hex): the secret is returned once, for the code, never stored."""
        subdomain = names.validate_subdomain(subdomain)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
            raise RegistryError("ttl must be between 1 s and %d days" % (MAX_TTL // 86400))
        check_port(port)  # the grant's checks, now: a redemption must not fail on them later
        check_comment(comment)
        policy = Policy().updated(changes)
        invite_id, secret = secrets.token_hex(INVITE_ID_SIZE), secrets.token_hex(SECRET_SIZE)
        now = time.time()
        row = dict(id=invite_id, subdomain=subdomain, secret_hash=_digest(secret),
                   policy=json.dumps(policy.to_json(), sort_keys=True), port=port,
                   comment=comment or "", actor=actor or default_actor(), created=now,
                   expires=now + ttl)

        def insert():
            with self._write():
                self._invites.create(**row)
                self._log(row["actor"], "invite", subdomain, None, "invite=%s expires=%.0f s "
                          "policy=%s" % (invite_id, ttl, policy.summary()))
            return _invite_of(self._invites.get_by_id(invite_id))

        return self._call(insert), secret

    def invites(self):
        model = self._invites
        query = model.select().order_by(model.created)
        return self._call(lambda: [_invite_of(row) for row in query])

    def delete_invite(self, invite_id, actor=None):
        """Withdraw an invite (used or not); True when there was one."""
        model = self._invites

        def delete():
            with self._write():
                row = model.get_or_none(model.id == str(invite_id))
                if row is None:
                    return False
                row.delete_instance()
                self._log(actor or default_actor(), "invite-delete", row.subdomain, None,
                          "invite=%s" % row.id)
            return True

        return self._call(delete)

    def redeem_invite(self, invite_id, secret, subdomain, key, actor="server"):
        """The Grant that invite ``invite_id`` becomes for ``key``; InviteRefused says why
        not (the same words for an unknown invite and a wrong secret)."""
        key = crypto.normalize_public_key(key)
        return self._call(self._redeem, str(invite_id), str(secret), subdomain, key, actor)

    def _redeem(self, invite_id, secret, subdomain, key, actor):
        model = self._invites
        with self._write():
            row = model.get_or_none(model.id == invite_id)
            if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
                refusal = "invite unknown or its secret is wrong (ask the operator for a new code)"
            else:
                refusal = _why_not(row, subdomain, time.time())
            if refusal is None:
                row.used, row.used_by = time.time(), key
                row.save()
                self._log(actor, "invite-used", row.subdomain, key, "invite=%s" % row.id)
                policy = Policy.from_json(json.loads(row.policy or "{}"))
                return self._grant(row.subdomain, key, row.port, row.comment, actor,
                                   changes=policy.to_json(), clear=())
        with self._write():  # committed on its own: the refusal raised next must not undo it
            self._log(actor, "invite-refused", subdomain, key, "invite=%s %s"
                      % (invite_id[:2 * INVITE_ID_SIZE], refusal))
        raise InviteRefused(refusal)


def _why_not(row, subdomain, now):
    if row.used is not None:
        return "invite %s was already used (codes work once; ask for a new one)" % row.id
    if now >= row.expires:
        return "invite %s expired (ask the operator for a new code)" % row.id
    if row.subdomain != subdomain:
        return "invite %s is for %r, not %r" % (row.id, row.subdomain, subdomain)
    return None


def _digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def _invite_of(row):
    return InviteRow(row.id, row.subdomain, Policy.from_json(json.loads(row.policy or "{}")),
                     row.port, row.comment, row.actor, row.created, row.expires, row.used,
                     row.used_by)
