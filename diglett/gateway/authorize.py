"""Whether an authenticated key may have the name it asked for: a pure decision.

``authorize(request, key, grants, sessions)`` looks only at what it is given (the CONFIG
request, the agent's key, the grants, the live sessions and other gateways' sessions) and
returns the Grant or a Refusal; it does no I/O and changes nothing, so every rule here is
tested without sockets. The caller gathers the inputs (a registry lookup for a grant made
since the last poll) and acts on the answer (a takeover of the same key's session).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diglett import admission, crypto, names
from diglett.wire import ErrorCode


@dataclass(frozen=True)
class Refusal:
    """ERROR(code, reason) goes back to the agent; ``penalty`` counts toward admission."""

    code: ErrorCode
    reason: str
    penalty: float = 0.0

    def __str__(self):
        return self.reason


def requested_name(request):
    """The subdomain the CONFIG asks for, canonical, or a Refusal saying why it is none."""
    try:
        return names.validate_subdomain(request.get("subdomain"))
    except (names.InvalidName, TypeError, AttributeError) as exc:
        return Refusal(ErrorCode.INVALID_NAME, "invalid subdomain: %s" % exc,
                       admission.PENALTY_AUTHFAIL)


def authorize(request, key, grants: Mapping | None, sessions: Mapping, *,
              elsewhere: Sequence = (), stopping=False):
    """Name, then grant, then in-use: only a key holding the grant learns about its name.

    ``grants`` maps (name, key) to Grant, or is None while none could be read (fail
    closed); ``sessions`` maps a name to this gateway's live session (anything with a
    ``key``); ``elsewhere`` holds other gateways' active session rows. A live session of
    the same key is no refusal: the new connection replaces it.
    """
    if stopping:
        return Refusal(ErrorCode.SHUTTING_DOWN, "server shutting down")
    name = requested_name(request)
    if isinstance(name, Refusal):
        return name
    if grants is None:
        return Refusal(ErrorCode.RESOURCE_SHORTAGE, "grants unavailable, retry later")
    grant = grants.get((name, key))
    if grant is None:
        return Refusal(ErrorCode.UNAUTHORIZED, "key %s has no grant for %r"
                       % (crypto.fingerprint(key), name), admission.PENALTY_AUTHFAIL)
    # The same key may move between gateways (the other one sees our newer session and ends
    # its own); another key must wait, as on one gateway.
    other = next((row for row in elsewhere if row.subdomain == name and row.key != key), None)
    if other is not None:
        return Refusal(ErrorCode.NAME_IN_USE, "%r is connected on gateway %s with another key"
                       % (name, other.gateway))
    current = sessions.get(name)
    if current is not None and current.key != key:
        return Refusal(ErrorCode.NAME_IN_USE, "%r is connected with another key" % name)
    return grant
