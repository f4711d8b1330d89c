"""Why a session ended: the one vocabulary the tunnel, the registry and the hooks share.

A ``CloseReason`` is stored in the registry's session rows and outbox, sent to hooks as
``SessionEvent.reason`` and shown by ``diglett-admin sessions``; its values are that contract
and must never change spelling. The free-text detail that goes with it is for logs only.
Stdlib only: the tunnel core imports this, and must not learn about signals or peewee.
"""

import enum


class CloseReason(enum.StrEnum):
    """Seen from the gateway; on the agent side the same names describe its own tunnel."""

    AGENT_LEFT = "agent-left"  # the peer closed, said GOAWAY, stopped reading, or the link broke
    DEAD = "dead"  # nothing heard from the peer for dead_after seconds
    ERROR = "error"  # the peer broke the protocol, or a bug of ours ended the tunnel
    KICKED = "kicked"  # diglett-admin kick
    REVOKED = "revoked"  # the grant went away while connected
    REPLACED = "replaced"  # a newer session of the same key took the name (here or elsewhere)
    SHUTDOWN = "shutdown"  # this end is stopping (SIGTERM, or the agent's Ctrl-C)
    STALE = "stale"  # left active by a gateway process that is gone; ended by the next one
