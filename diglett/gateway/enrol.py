"""Enrolment at admission: a CONFIG carrying ``enroll`` redeems its invite into a grant.

The secret travels inside the Noise session, after the agent has authenticated the server by
the key pinned from the code, so only the real server ever sees it; the server compares its
SHA-256 with the stored one. A malformed, unknown, wrong, used, expired or misnamed invite is
a Refusal with the reason and an admission penalty, like a missing grant. It must not decide
anything else: after a redemption the usual authorize() runs with the new grant.
"""

import logging
import re

from diglett import admission, crypto
from diglett.gateway.authorize import Refusal
from diglett.invitecode import INVITE_ID_SIZE, SECRET_SIZE
from diglett.registry import RegistryError
from diglett.registry.records import InviteRefused
from diglett.wire import ErrorCode

log = logging.getLogger(__name__)

INVITE_ID_RE = re.compile(r"[0-9a-f]{%d}" % (2 * INVITE_ID_SIZE))
SECRET_RE = re.compile(r"[0-9a-f]{%d}" % (2 * SECRET_SIZE))


def enrolment(request):
    """(invite id, secret) from the CONFIG's ``enroll``; None without one; Refusal if bad."""
    if not isinstance(request, dict) or "enroll" not in request:
        return None
    enroll = request["enroll"]
    invite_id = enroll.get("invite") if isinstance(enroll, dict) else None
    secret = enroll.get("secret") if isinstance(enroll, dict) else None
    if not (isinstance(invite_id, str) and INVITE_ID_RE.fullmatch(invite_id)
            and isinstance(secret, str) and SECRET_RE.fullmatch(secret)):
        return Refusal(ErrorCode.UNAUTHORIZED, "malformed enroll field in CONFIG",
                       admission.PENALTY_AUTHFAIL)
    return invite_id, secret


def redeem(server, name, key, request):
    """None when the CONFIG enrols nothing or its invite became the grant (now in the
    server's grant cache); a Refusal otherwise."""
    found = enrolment(request)
    if found is None or isinstance(found, Refusal) or not isinstance(name, str):
        return found
    invite_id, secret = found
    try:
        grant = server.db.call(server.registry.redeem_invite, invite_id, secret, name, key)
    except InviteRefused as exc:
        log.warning("subdomain=%s agent=%s enrolment refused: %s", name,
                    crypto.fingerprint(key), exc)
        return Refusal(ErrorCode.UNAUTHORIZED, "enrolment refused: %s" % exc,
                       admission.PENALTY_AUTHFAIL)
    except RegistryError as exc:
        log.warning("subdomain=%s enrolment failed: %s", name, exc)
        return Refusal(ErrorCode.RESOURCE_SHORTAGE, "enrolment unavailable, retry later")
    log.info("subdomain=%s agent=%s enrolled with invite %s", name, crypto.fingerprint(key),
             invite_id)
    server.grants.add(grant)
    return None
