"""The event bus: every blinker signal diglett sends, and the one payload they carry.

The tunnel core sends these and knows no hook; hook modules connect to them (through
diglett.hookloader, which guards each receiver). Signals observe, they never decide: a
receiver cannot veto or delay a session.
"""

import enum
import time
import uuid
from dataclasses import asdict, dataclass, field

import blinker

from diglett.reasons import CloseReason

__all__ = ["CloseReason", "EventKind", "SessionEvent", "session_started", "session_ended",
           "session_updated", "signal_of", "method_of"]

bus = blinker.Namespace()

#: An agent got its tunnel port. Sent with ``event=SessionEvent(kind=EventKind.CONNECT)``.
session_started = bus.signal("session-started")

#: A session ended, for any CloseReason.
#: Sent with ``event=SessionEvent(kind=EventKind.DISCONNECT)``.
session_ended = bus.signal("session-ended")

#: A live session's grant changed its access policy (``diglett-admin set``): routes are
#: rendered again, the agent stays connected. Sent with ``event=SessionEvent(kind=UPDATE)``.
session_updated = bus.signal("session-updated")


class EventKind(enum.StrEnum):
    """The two events, by the name stored in the outbox and given to scripts as DIGLETT_EVENT."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"
    UPDATE = "update"


# The one table of an event's other names: its signal and the hook method it calls.
_NAMES = {
    EventKind.CONNECT: (session_started, "session_started"),
    EventKind.DISCONNECT: (session_ended, "session_ended"),
    EventKind.UPDATE: (session_updated, "session_updated"),
}


def signal_of(kind):
    return _NAMES[EventKind(kind)][0]


def method_of(kind):
    """The hook method named after the signal (``session_started``, ``session_ended``)."""
    return _NAMES[EventKind(kind)][1]


@dataclass(frozen=True)
class SessionEvent:
    kind: EventKind
    subdomain: str  # the granted name, a validated DNS label
    host: str  # public host name: NAME.DOMAIN
    listen_host: str  # where the session's tunnel port listens
    listen_port: int
    agent_key: str  # agent public key, 66 hex digits
    session_id: str
    reason: str = ""  # why the session ended (a CloseReason value); empty on connect
    time: float = field(default_factory=time.time)
    started: float = 0.0  # when the session began (which of two sessions is newer)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # the grant's access policy (diglett.policy.Policy.to_json(), checked by the server);
    # empty: the hook's own settings. Not in fields(): scripts and webhooks see no secrets.
    policy: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "kind", EventKind(self.kind))  # a typo fails here, not later

    def to_json(self):
        """Every field, as stored in the outbox; from_json() reverses it."""
        data = asdict(self)
        data["kind"], data["reason"] = str(self.kind), str(self.reason)
        return data

    @classmethod
    def from_json(cls, data):
        return cls(**data)

    @property
    def signal(self):
        return signal_of(self.kind)

    def fields(self):
        """What scripts (as DIGLETT_<NAME> variables) and webhooks (as JSON) receive."""
        return {
            "event": self.kind,
            "subdomain": self.subdomain,
            "host": self.host,
            "address": self.listen_host,
            "port": self.listen_port,
            "agent_key": self.agent_key,
            "session": self.session_id,
            "reason": self.reason,
            "event_id": self.event_id,
            "time": self.time,
        }
