"""An agent's first seconds on the gateway: preamble, the Noise XK acts, the CONFIG record.

Runs in the connection's own greenlet under a deadline that shrinks under pressure; every
failure is one log line with the peer address, a count by ``Failure`` or HandshakeFault
(the handshake_failures metric), an admission penalty when the bytes were junk, and a closed
socket. It must not authorize: a completed handshake only proves which key the agent holds.
"""

import enum
import logging
import time
from dataclasses import dataclass

import gevent

from diglett import admission, noise, protocol, wire
from diglett.noise import HandshakeFault
from diglett.sockets import recv_exact
from diglett.wire import ProtocolError, RejectCode

log = logging.getLogger(__name__)

PRESSURE_HANDSHAKE_MIN = 1.0  # seconds: the shortest handshake deadline under pressure


class Failure(enum.StrEnum):
    """Why a handshake failed, besides the HandshakeFault of bad Noise bytes."""

    TIMEOUT = "timeout"  # nothing (or not act one) within the deadline
    TIMEOUT_AFTER_ACT_ONE = "timeout after act one"  # an honest but slow agent, no penalty
    BAD_PREAMBLE = "bad preamble or CONFIG"
    NETWORK = "network"  # the connection broke


class HandshakeTimeout(Exception):
    pass


@dataclass(frozen=True)
class Completed:
    """A handshake that finished: the agent's static key, the live session, its CONFIG."""

    key: str  # 66 hex digits
    session_id: str  # from the handshake hash: the same on both ends, unique per session
    session: protocol.Session
    request: dict  # the CONFIG JSON


class Handshakes:
    def __init__(self, keys, admission_control):
        self.keys = keys  # the server's static private keys (the first one is announced)
        self.admission = admission_control
        self.failures = {}  # Failure or HandshakeFault -> count

    def run(self, sock, peer, source, config):
        """The Completed handshake, or None when it failed (logged, counted, socket closed).
        Releases the admission slot either way."""
        timeout = config.handshake_timeout
        if self.admission.pending > self.admission.start:
            # Under pressure slow handshakes lose their slot sooner: an honest agent needs
            # two round trips, a flood's silent connections would hold the slot to the end.
            timeout = min(timeout, max(PRESSURE_HANDSHAKE_MIN, timeout / 4))
        progress = []  # what arrived: an agent that sent act one is no flood, only slow
        try:
            with gevent.Timeout(timeout, HandshakeTimeout):
                return self._exchange(sock, config, progress)
        except HandshakeTimeout:
            # An honest agent sends act one at once; if it came, the wait was ours or the
            # network's, and a penalty would lock its address out of the slots above START.
            if progress:
                self._failed(sock, source, peer, Failure.TIMEOUT_AFTER_ACT_ONE, "", 0)
            else:
                self._failed(sock, source, peer, Failure.TIMEOUT, "", admission.PENALTY_TIMEOUT)
        except noise.HandshakeError as exc:
            self._failed(sock, source, peer, exc.reason, exc, admission.PENALTY_JUNK)
        except ProtocolError as exc:
            self._failed(sock, source, peer, Failure.BAD_PREAMBLE, exc, admission.PENALTY_JUNK)
        except OSError as exc:
            self._failed(sock, source, peer, Failure.NETWORK, exc.strerror or exc, 0)
        finally:
            self.admission.release(source)
        return None

    def _exchange(self, sock, config, progress):
        preamble_bytes = recv_exact(sock, wire.PREAMBLE_SIZE)
        preamble = wire.parse_preamble(preamble_bytes)
        if preamble.version != wire.WIRE_VERSION:
            sock.sendall(wire.encode_reject(RejectCode.UNSUPPORTED_VERSION))
            raise ProtocolError("unsupported wire version %d" % preamble.version)
        handshake = noise.Responder(self.keys, wire.prologue(preamble_bytes))
        act_one = recv_exact(sock, noise.ACT_ONE_SIZE)
        try:
            act_two = handshake.read_act_one(act_one)
        except noise.HandshakeError as exc:
            if exc.reason is HandshakeFault.ACT1_BAD_TAG:  # made for another server key
                sock.sendall(wire.encode_reject(RejectCode.SERVER_KEY_MISMATCH))
            raise
        progress.append("act one")
        sock.sendall(act_two)
        handshake.read_act_three(recv_exact(sock, noise.ACT_THREE_SIZE))
        session = protocol.Session(protocol.SERVER, handshake.send_cipher, handshake.recv_cipher,
                                   window=config.stream_window, max_streams=config.max_streams,
                                   guard=protocol.FloodGuard(time.monotonic, config.ping_limit,
                                                             config.flood_limit))
        return Completed(key=handshake.remote_static.hex(),
                         session_id=handshake.handshake_hash[:8].hex(),
                         session=session, request=_read_config(sock, session))

    def _failed(self, sock, source, peer, category, detail, penalty):
        """``category`` is a fixed value (a metric label); ``detail`` may hold peer bytes."""
        self.failures[category] = self.failures.get(category, 0) + 1
        log.info("agent=%s handshake failed: %s", peer, detail or category)
        self.admission.penalise(source, penalty)
        sock.close()


def _read_config(sock, session):
    """The CONFIG record that must follow act three, alone."""
    events = []
    while not events:
        data = sock.recv(wire.MAX_CONFIG_SIZE + 64)
        if not data:
            raise ProtocolError("connection closed before CONFIG")
        events = session.receive_data(data)
    if len(events) != 1 or type(events[0]) is not protocol.ConfigReceived:
        raise ProtocolError("expected CONFIG alone, got %s" % [type(e).__name__ for e in events])
    return events[0].config
