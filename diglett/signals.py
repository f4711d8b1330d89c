"""The event bus: every blinker signal diglett sends, and the one payload they carry.

The tunnel core sends these and knows no hook; hook modules connect to them (through
diglett.hookloader, which guards each receiver). Signals observe, they never decide: a
receiver cannot veto or delay a session.
"""

import time
import uuid
from dataclasses import asdict, dataclass, field

import blinker

bus = blinker.Namespace()

#: An agent got its tunnel port. Sent with ``event=SessionEvent(kind="connect")``.
session_started = bus.signal("session-started")

#: A session ended for any reason (agent-left, kicked, revoked, replaced, shutdown, stale,
#: dead, error). Sent with ``event=SessionEvent(kind="disconnect")``.
session_ended = bus.signal("session-ended")


@dataclass(frozen=True)
class SessionEvent:
    kind: str  # "connect" or "disconnect"
    subdomain: str  # the granted name, a validated DNS label
    host: str  # public host name: NAME.DOMAIN
    listen_host: str  # where the session's tunnel port listens
    listen_port: int
    agent_key: str  # agent public key, 66 hex digits
    session_id: str
    reason: str = ""  # why the session ended; empty on connect
    time: float = field(default_factory=time.time)
    started: float = 0.0  # when the session began (which of two sessions is newer)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self):
        """Every field, as stored in the outbox; from_json() reverses it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data):
        return cls(**data)

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
