"""The multiplexing state machine of one agent connection, after the handshake: sans-IO.

Bytes go in through ``receive_data`` and come out as events; commands (open, data, fin,
reset, acknowledge, ping, goaway) queue frames that ``data_to_send`` packs into sealed
records. This module owns stream ids, stream states and credit windows. It must not touch
sockets, gevent, the registry or signals: diglett.tunnel drives it over a socket.

Why one module of ~600 lines: it is one state machine. The stream states, the credit
arithmetic and the flood accounting change together on every frame, and the fuzzers drive
them as a whole; split, each part would need the others' internals.
"""

import collections
from dataclasses import dataclass

from diglett import wire
from diglett.crypto import DecryptError, RECORD_HEADER_SIZE, TAG_SIZE
from diglett.wire import ErrorCode, FrameType, ProtocolError

DEFAULT_WINDOW = 2 * 1024 * 1024  # per-stream credit per direction (W0), as OpenSSH
DEFAULT_MAX_STREAMS = 16384  # concurrent streams per agent
OUTPUT_CHUNK = 256 * 1024  # bytes data_to_send returns at most per call (writer latency)
MAX_PENDING_PONGS = 4  # PINGs beyond this many unanswered are dropped (ping flood)
PING_LIMIT = 1000  # PINGs a peer may send per minute (one every 10 s is normal)
# Frames that move nothing forward, per second: FIN, RESET or WINDOW for closed streams,
# PONGs. (Empty records are refused outright.) Frames already in flight when a stream closes
# arrive late by nature: each stream this side closes adds LATE_FRAMES to the allowance, so a
# mass reset of any number of streams never looks like a flood.
FLOOD_LIMIT = 20000
LATE_FRAMES = 3  # a WINDOW, a FIN and a RESET may cross a close

SERVER = "server"
AGENT = "agent"
FEATURE_RETRY_AFTER = "retry-after"  # GOAWAY carries a u32 reconnect delay (docs/protocol.md §13)
FEATURES = frozenset({FEATURE_RETRY_AFTER})  # the optional features this implementation knows


# Events. Frozen and slotted: cheap to create on the data path, safe to pass around.
@dataclass(frozen=True, slots=True)
class ConfigReceived:
    config: dict  # the agent's CONFIG JSON (server side)


@dataclass(frozen=True, slots=True)
class Accepted:
    info: dict  # the server's OK JSON (agent side)


@dataclass(frozen=True, slots=True)
class Refused:
    code: int  # ERROR from the server (agent side); the server closes next
    reason: str


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int  # a client connected on the server (agent side)
    info: dict


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: int  # the peer half-closed: no more DATA will come


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    stream_id: int  # more send credit: a blocked sender may go on


@dataclass(frozen=True, slots=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    code: int
    reason: str
    retry_after: int = 0  # seconds the sender asks us to wait before reconnecting


_FIN = None  # marker in a stream's send queue: the FIN goes out after the queued DATA
_DATA = int(FrameType.DATA)  # compared and packed once per record: a plain int is cheaper


class _Reset:
    """Marker in a stream's send queue: a RESET that goes out after the queued DATA."""

    __slots__ = ("code",)

    def __init__(self, code):
        self.code = code


class StreamState:
    """Flow-control bookkeeping of one stream; buffers of delivered bytes live in the I/O layer."""

    __slots__ = (
        "stream_id", "send_credit", "recv_allowed", "unacked", "queue", "ready",
        "fin_queued", "fin_sent", "fin_received",
    )

    def __init__(self, stream_id, window):
        self.stream_id = stream_id
        self.send_credit = window  # bytes of DATA we may still send
        self.recv_allowed = window  # bytes of DATA the peer may still send
        self.unacked = 0  # delivered bytes whose credit has not been returned yet
        self.queue = collections.deque()  # DATA payloads and at most one _FIN, in order
        self.ready = False  # listed in Session._ready
        self.fin_queued = False
        self.fin_sent = False
        self.fin_received = False


class _Window:
    """Events counted in fixed windows against a limit, with an allowance that lasts the
    window it was given in and the next."""

    __slots__ = ("limit", "length", "start", "count", "allowance", "carried")

    def __init__(self, limit, length):
        self.limit, self.length = limit, length
        self.start, self.count, self.allowance, self.carried = 0.0, 0, 0, 0

    def roll(self, now):
        elapsed = now - self.start
        if elapsed >= self.length:
            self.carried = self.allowance if elapsed < 2 * self.length else 0
            self.start, self.count, self.allowance = now, 0, 0

    def over(self):
        return self.count > self.limit + self.allowance + self.carried


class FloodGuard:
    """Counts what a peer sends that costs work but moves no stream forward, and ends the
    session (ENHANCE_YOUR_CALM) when a count passes its limit within its window.

    Counted in fixed windows: cheap (the clock is read only for counted frames), and a burst
    across a window edge gets at most twice the limit. ``clock`` returns seconds (the driver
    passes time.monotonic), so this module stays free of I/O and tests can drive time.
    A limit of 0 turns that count off.
    """

    def __init__(self, clock, ping_limit=PING_LIMIT, flood_limit=FLOOD_LIMIT):
        self.clock = clock
        self._pings = _Window(ping_limit, 60.0)
        self._idle = _Window(flood_limit, 1.0)

    def ping(self):
        self._count(self._pings, "PINGs", "minute")

    def idle(self):
        self._count(self._idle, "frames that move no stream forward", "second")

    def closed(self):
        """A stream closed here: the frames the peer had in flight for it are not a flood.
        The allowance lasts this window and the next: late frames are a round trip behind."""
        if self._idle.limit:
            self._idle.roll(self.clock())
            self._idle.allowance += LATE_FRAMES

    def _count(self, window, what, unit):
        if not window.limit:
            return
        window.roll(self.clock())
        window.count += 1
        if window.over():
            raise ProtocolError("flood: more than %d %s in a %s" % (window.limit, what, unit),
                                ErrorCode.ENHANCE_YOUR_CALM)


class Session:
    """One side of an authenticated agent connection (role SERVER or AGENT)."""

    def __init__(self, role, send_cipher, recv_cipher, *, window=DEFAULT_WINDOW,
                 max_streams=DEFAULT_MAX_STREAMS, guard=None):
        self.role = role
        self.window = window  # the agent learns the real value from OK
        self.max_streams = max_streams
        self.streams = {}
        self.last_stream_id = 0  # highest id opened; lower ids not in streams are closed
        self.configured = False  # CONFIG seen (server) or OK/ERROR seen (agent)
        self.features = frozenset()  # optional features both sides use, settled by OK
        self._offered = frozenset()  # by the agent's CONFIG, among those we know
        self.records_in = 0
        self.records_out = 0
        self._send_cipher = send_cipher
        self._recv_cipher = recv_cipher
        self._inbuf = bytearray()
        self._body_len = None  # decrypted length of the record being received
        self._control = collections.deque()  # encoded non-DATA frames, sent first
        self._ready = collections.deque()  # streams with queued DATA or FIN, round robin
        self._pending_pongs = 0
        self._guard = guard if guard is not None else FloodGuard(lambda: 0.0, 0, 0)  # off

    # ----- commands -------------------------------------------------------------------
    def send_config(self, config):
        self._offered = frozenset(config.get("features", ())) & FEATURES
        self._control.append(wire.encode_frame(
            FrameType.CONFIG, 0, wire.encode_json(config, wire.MAX_CONFIG_SIZE)))

    @property
    def offered(self):
        """Server: the optional features the agent's CONFIG offered that we know."""
        return self._offered

    def accept(self, info):
        """OK; its ``features`` (a subset of ``offered``) are the ones in use from now on."""
        self.window = info["window"]
        self.features = frozenset(info.get("features", ())) & self._offered
        self._control.append(wire.encode_frame(
            FrameType.OK, 0, wire.encode_json(info, wire.MAX_CONFIG_SIZE)))

    def refuse(self, code, reason):
        self._control.append(wire.encode_frame(
            FrameType.ERROR, 0, wire.encode_code_reason(code, reason)))

    def open_stream(self, info=None):
        """Server: a client connected; returns the new stream id (ids are never reused)."""
        if self.last_stream_id >= wire.MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted", ErrorCode.NO_ERROR)
        self.last_stream_id += 1
        stream_id = self.last_stream_id
        self.streams[stream_id] = StreamState(stream_id, self.window)
        payload = wire.encode_json(info, wire.MAX_OPEN_INFO_SIZE) if info else b""
        self._control.append(wire.encode_frame(FrameType.OPEN, stream_id, payload))
        return stream_id

    def send_credit(self, stream_id):
        stream = self.streams.get(stream_id)
        if stream is None or stream.fin_queued:
            return 0
        return stream.send_credit

    def send_data(self, stream_id, data):
        """Queue DATA within the stream's credit; False if the stream is gone (reset)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.fin_queued:
            return False
        if len(data) > stream.send_credit:
            raise ValueError("%d bytes exceed the credit of %d" % (len(data), stream.send_credit))
        if not data:  # nothing to queue; marking the stream ready would leave it empty
            return True
        stream.send_credit -= len(data)
        if len(data) <= wire.MAX_DATA_PAYLOAD:
            stream.queue.append(data)
        else:  # one frame each; memoryview slices copy nothing until the frame is built
            view = memoryview(data)
            for offset in range(0, len(data), wire.MAX_DATA_PAYLOAD):
                stream.queue.append(view[offset:offset + wire.MAX_DATA_PAYLOAD])
        self._mark_ready(stream)
        return True

    def send_fin(self, stream_id):
        stream = self.streams.get(stream_id)
        if stream is None or stream.fin_queued:
            return
        stream.fin_queued = True
        stream.queue.append(_FIN)
        self._mark_ready(stream)

    def reset_stream(self, stream_id, code, after_queued=False):
        """Abort a stream: RESET goes out with the control frames and queued DATA is dropped,
        or, ``after_queued``, the DATA already queued goes out first (the local peer sent
        those bytes before it reset, so the remote peer must get them too)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if after_queued and stream.queue:
            stream.fin_queued = True  # no more DATA on it
            stream.queue.append(_Reset(code))
            self._mark_ready(stream)
            return
        del self.streams[stream_id]
        self._guard.closed()
        self._control.append(wire.encode_frame(FrameType.RESET, stream_id, wire.encode_u16(code)))

    def acknowledge(self, stream_id, nbytes):
        """``nbytes`` of the stream were delivered to their socket: return the credit.

        Credit goes back only for delivered bytes, so a stalled reader holds at most one
        window of buffered data; batching to half a window keeps WINDOW frames rare.
        """
        stream = self.streams.get(stream_id)
        if stream is None or stream.fin_received:
            return
        stream.unacked += nbytes
        # "and unacked": with a window of 1 the threshold is 0, and WINDOW 0 is a peer error.
        if stream.unacked and stream.unacked >= self.window // 2:
            stream.recv_allowed += stream.unacked
            self._control.append(wire.encode_frame(
                FrameType.WINDOW, stream_id, wire.encode_u32(stream.unacked)))
            stream.unacked = 0

    def ping(self, payload):
        self._control.append(wire.encode_frame(FrameType.PING, 0, payload))

    def goaway(self, code, reason="", retry_after=0):
        """The session ends; ``retry_after`` asks the peer to wait that many seconds first.
        A peer without the feature gets it in the reason (``retry-after=N``), as before."""
        if FEATURE_RETRY_AFTER in self.features:
            payload = wire.encode_goaway(code, retry_after, reason)
        else:
            if retry_after:
                reason = "%s; retry-after=%d" % (reason, retry_after)
            payload = wire.encode_code_reason(code, reason)
        self._control.append(wire.encode_frame(FrameType.GOAWAY, 0, payload))

    # ----- output ---------------------------------------------------------------------
    @property
    def cipher_name(self):
        return self._send_cipher.aead_name

    @property
    def has_output(self):
        return bool(self._control or self._ready)

    @property
    def buffered_output(self):
        """Bytes of DATA queued but not yet sealed (for budgets and debug stats)."""
        return sum(len(item) for s in self.streams.values() for item in s.queue
                   if item is not _FIN and type(item) is not _Reset)

    def data_to_send(self, limit=OUTPUT_CHUNK):
        """Seal queued frames into records: control first, then one DATA frame per stream per turn."""
        return b"".join(self.buffers_to_send(limit))

    def buffers_to_send(self, limit=OUTPUT_CHUNK):
        """data_to_send as a list of buffers, for a scatter-gather write (no joining copy)."""
        if not self._control and len(self._ready) == 1:  # the common case: one stream's DATA
            stream = self._ready[0]
            if len(stream.queue) == 1 and stream.stream_id in self.streams:
                item = stream.queue[0]
                if item is not _FIN and type(item) is not _Reset:
                    self._ready.popleft()
                    stream.queue.popleft()
                    stream.ready = False
                    self.records_out += 1
                    return list(self._send_cipher.seal_parts(
                        wire.encode_frame(_DATA, stream.stream_id, item)))
        buffers = []
        total = 0
        seal = self._send_cipher.seal_parts
        while total < limit and (self._control or self._ready):
            plaintext = self._next_plaintext()
            if not plaintext:
                break
            header, body = seal(plaintext)
            self.records_out += 1
            buffers.append(header)
            buffers.append(body)
            total += len(header) + len(body)
        return buffers

    def _next_plaintext(self):
        parts = []
        room = wire.MAX_RECORD_PLAINTEXT
        control = self._control
        while control and len(control[0]) <= room:
            frame = control.popleft()
            if frame[0] == FrameType.PONG:
                self._pending_pongs -= 1
            parts.append(frame)
            room -= len(frame)
        ready = self._ready
        while ready and not control:  # DATA never overtakes an OPEN still queued
            stream = ready[0]
            if stream.stream_id not in self.streams:  # reset meanwhile
                ready.popleft()
                stream.ready = False
                continue
            item = stream.queue[0]
            frame = self._frame_of(stream, item)
            if len(frame) > room:
                break
            ready.popleft()
            stream.queue.popleft()
            room -= len(frame)
            parts.append(frame)
            if item is _FIN:
                self._fin_sent(stream)
            elif type(item) is _Reset:
                self.streams.pop(stream.stream_id, None)
                self._guard.closed()
            if stream.queue:
                ready.append(stream)
            else:
                stream.ready = False
        return b"".join(parts)

    @staticmethod
    def _frame_of(stream, item):
        if item is _FIN:
            return wire.encode_frame(FrameType.FIN, stream.stream_id)
        if type(item) is _Reset:
            return wire.encode_frame(FrameType.RESET, stream.stream_id, wire.encode_u16(item.code))
        return wire.encode_frame(FrameType.DATA, stream.stream_id, item)

    def _mark_ready(self, stream):
        if not stream.ready:
            stream.ready = True
            self._ready.append(stream)

    def _fin_sent(self, stream):
        stream.fin_sent = True
        if stream.fin_received:
            self.streams.pop(stream.stream_id, None)
            self._guard.closed()

    # ----- input ----------------------------------------------------------------------
    def receive_data(self, data):
        """Feed bytes from the socket; returns the events of every complete record.

        Headers and bodies are decrypted straight out of ``data`` (no copy, and no view of it
        is kept: the caller may reuse the buffer); only a header or body cut by the end of
        ``data`` is kept, and completed from the next call.
        """
        events = []
        view = memoryview(data)
        size, offset = len(view), 0
        cipher = self._recv_cipher
        try:
            while True:
                need = RECORD_HEADER_SIZE if self._body_len is None else self._body_len + TAG_SIZE
                if self._inbuf:  # finish the piece an earlier read cut short
                    take = min(need - len(self._inbuf), size - offset)
                    self._inbuf += view[offset:offset + take]
                    offset += take
                    if len(self._inbuf) < need:
                        break
                    piece, self._inbuf = self._inbuf, bytearray()
                elif size - offset < need:
                    if offset < size:
                        self._inbuf += view[offset:]
                    break
                else:
                    piece = view[offset:offset + need]
                    offset += need
                if self._body_len is None:  # a whole record header
                    self._body_len = cipher.open_length(piece)
                    continue
                plaintext = cipher.open_body(piece)  # a whole record body
                self._body_len = None
                self.records_in += 1
                for frame in wire.decode_frames(plaintext):
                    if frame.type == _DATA:  # most records: straight to their handler
                        self._on_data(frame, events)
                    else:
                        self._handle(frame, events)
        except DecryptError as exc:
            raise ProtocolError(str(exc)) from None
        return events

    def _handle(self, frame, events):
        ftype = frame.type
        if ftype == FrameType.DATA:
            self._on_data(frame, events)
        elif ftype in _STREAM_HANDLERS:
            _STREAM_HANDLERS[ftype](self, frame, events)
        elif not self.configured:
            self._on_first_frame(frame, events)
        elif ftype == FrameType.PING:
            self._guard.ping()
            if self._pending_pongs < MAX_PENDING_PONGS:
                self._pending_pongs += 1
                self._control.append(wire.encode_frame(FrameType.PONG, 0, frame.payload))
        elif ftype == FrameType.PONG:
            self._guard.idle()
            events.append(PongReceived(frame.payload))
        elif ftype == FrameType.GOAWAY:
            if FEATURE_RETRY_AFTER in self.features:
                events.append(GoAwayReceived(*wire.decode_goaway(frame.payload)))
            else:
                events.append(GoAwayReceived(*wire.decode_code_reason(frame.payload)))
        else:
            raise ProtocolError("unexpected %s from the %s" % (FrameType(ftype).name, self._peer))

    @property
    def _peer(self):
        return AGENT if self.role == SERVER else SERVER

    def _on_first_frame(self, frame, events):
        ftype = frame.type
        if self.role == SERVER and ftype == FrameType.CONFIG:
            config = wire.decode_json(frame.payload, "CONFIG")
            offered = config.get("features")
            if isinstance(offered, list):
                self._offered = frozenset(f for f in offered if isinstance(f, str)) & FEATURES
            events.append(ConfigReceived(config))
        elif self.role == AGENT and ftype == FrameType.OK:
            info = wire.decode_json(frame.payload, "OK")
            window = info.get("window")
            if not isinstance(window, int) or not 1 <= window <= wire.MAX_WINDOW:
                raise ProtocolError("OK announces window %r" % (window,))
            self.window = window
            used = info.get("features")
            if isinstance(used, list):  # only what we offered: a server cannot impose one
                self.features = frozenset(f for f in used if isinstance(f, str)) & self._offered
            events.append(Accepted(info))
        elif self.role == AGENT and ftype == FrameType.ERROR:
            events.append(Refused(*wire.decode_code_reason(frame.payload)))
        elif ftype == FrameType.GOAWAY:
            events.append(GoAwayReceived(*wire.decode_code_reason(frame.payload)))
            return
        else:
            raise ProtocolError("first frame from the %s is %s" % (self._peer, FrameType(ftype).name))
        self.configured = True

    def _known_stream(self, frame):
        """The stream a frame is for, None for a closed one; a never-opened id is an error."""
        stream = self.streams.get(frame.stream_id)
        if stream is None and frame.stream_id > self.last_stream_id:
            raise ProtocolError("%s for stream %d that was never opened"
                                % (FrameType(frame.type).name, frame.stream_id))
        return stream  # None: closed, and late frames for closed streams are normal races

    def _on_data(self, frame, events):
        stream = self.streams.get(frame.stream_id)  # _known_stream, inlined: once per record
        if stream is None:
            if frame.stream_id > self.last_stream_id:
                raise ProtocolError("DATA for stream %d that was never opened" % frame.stream_id)
            return  # late DATA after a reset is the normal race, and pays its way per byte
        if stream.fin_received:
            raise ProtocolError("DATA after FIN on stream %d" % frame.stream_id,
                                ErrorCode.STREAM_CLOSED)
        size = len(frame.payload)
        if size > stream.recv_allowed:
            raise ProtocolError("stream %d sent %d bytes beyond its window"
                                % (frame.stream_id, size - stream.recv_allowed),
                                ErrorCode.FLOW_CONTROL_ERROR)
        stream.recv_allowed -= size
        events.append(DataReceived(frame.stream_id, frame.payload))

    def _on_open(self, frame, events):
        if self.role != AGENT or not self.configured:
            raise ProtocolError("OPEN from the %s" % self._peer)
        if frame.stream_id <= self.last_stream_id:
            raise ProtocolError("OPEN reuses stream id %d" % frame.stream_id)
        self.last_stream_id = frame.stream_id
        info = wire.decode_json(frame.payload, "OPEN") if frame.payload else {}
        if len(self.streams) >= self.max_streams:
            self._control.append(wire.encode_frame(
                FrameType.RESET, frame.stream_id, wire.encode_u16(ErrorCode.REFUSED_STREAM)))
            return
        self.streams[frame.stream_id] = StreamState(frame.stream_id, self.window)
        events.append(StreamOpened(frame.stream_id, info))

    def _on_fin(self, frame, events):
        stream = self._known_stream(frame)
        if stream is None or stream.fin_received:
            self._guard.idle()
            return
        stream.fin_received = True
        if stream.fin_sent:
            del self.streams[frame.stream_id]
            self._guard.closed()
        events.append(StreamEnded(frame.stream_id))

    def _on_reset(self, frame, events):
        stream = self._known_stream(frame)
        if stream is None:
            self._guard.idle()
            return
        del self.streams[frame.stream_id]
        events.append(StreamReset(frame.stream_id, wire.decode_u16(frame.payload)))

    def _on_window(self, frame, events):
        stream = self._known_stream(frame)
        increment = wire.decode_u32(frame.payload)
        if increment == 0:
            raise ProtocolError("WINDOW of 0 on stream %d" % frame.stream_id)
        if stream is None:
            self._guard.idle()
            return
        if stream.send_credit + increment > wire.MAX_WINDOW:
            raise ProtocolError("WINDOW overflows the credit of stream %d" % frame.stream_id,
                                ErrorCode.FLOW_CONTROL_ERROR)
        stream.send_credit += increment
        events.append(WindowUpdated(frame.stream_id))


_STREAM_HANDLERS = {
    FrameType.OPEN: Session._on_open,
    FrameType.FIN: Session._on_fin,
    FrameType.RESET: Session._on_reset,
    FrameType.WINDOW: Session._on_window,
}
