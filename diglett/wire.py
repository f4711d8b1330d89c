"""Wire format: the cleartext preamble, reject codes, frames and their payloads, limits.

This module turns frames into bytes and bytes into frames; it owns every size limit of the
protocol. It must not touch sockets, ciphers or sessions: diglett.protocol drives it.
Only the standard library is imported here. docs/protocol.md is the specification.
"""

import enum
import json
import struct
from typing import NamedTuple

MAGIC = b"digl"  # same as the Rust prototype, so an old peer fails at once
WIRE_VERSION = 2  # the Rust prototype's plaintext handshake was 1; never reuse it
PREAMBLE_SIZE = 8
PROLOGUE_LABEL = b"diglett-wire"  # Noise prologue = label || preamble

FRAME_HEADER_SIZE = 8  # type u8 | flags u8 | stream_id u32 | length u16
MAX_RECORD_PLAINTEXT = 65535  # BOLT 8: the record length is a u16
MAX_DATA_PAYLOAD = MAX_RECORD_PLAINTEXT - FRAME_HEADER_SIZE  # a DATA frame fills one record
MAX_CONFIG_SIZE = 4096  # CONFIG and OK JSON; small so pre-grant input stays cheap
MAX_OPEN_INFO_SIZE = 512  # OPEN's optional JSON
MAX_REASON_SIZE = 256  # UTF-8 reason of ERROR and GOAWAY
MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW = 2**31 - 1  # credit above this is a flow-control error, as in HTTP/2
PING_SIZE = 8

_HEADER = struct.Struct(">BBIH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke a rule. ``code`` is the ErrorCode to send in GOAWAY before closing."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = ErrorCode.PROTOCOL_ERROR if code is None else code


class FrameType(enum.IntEnum):
    CONFIG = 0x01  # agent -> server, first frame: JSON with the requested subdomain
    OK = 0x02  # server -> agent: tunnel is up; JSON with host, port, window, ...
    ERROR = 0x03  # server -> agent: refusal (u16 code + reason), then close
    OPEN = 0x04  # server -> agent: a client connected; new stream id
    DATA = 0x05  # both: stream bytes; consumes credit
    FIN = 0x06  # both: half-close, no more DATA from the sender on this stream
    RESET = 0x07  # both: abortive close (u16 code)
    WINDOW = 0x08  # both: return u32 bytes of credit for a stream
    PING = 0x09  # both: 8 opaque bytes, answered by PONG
    PONG = 0x0A  # both: the PING's 8 bytes echoed
    GOAWAY = 0x0B  # both: u16 code + reason; the sender closes after flushing


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    REFUSED_STREAM = 5
    CONNECT_FAILED = 6
    RESOURCE_SHORTAGE = 7
    ENHANCE_YOUR_CALM = 8
    UNAUTHORIZED = 9
    NAME_IN_USE = 10
    INVALID_NAME = 11
    REVOKED = 12
    REPLACED = 13
    IDLE_TIMEOUT = 14
    SHUTTING_DOWN = 15
    BAD_CONFIG = 16
    KICKED = 17


def code_name(code):
    try:
        return ErrorCode(code).name
    except ValueError:
        return "UNKNOWN_%d" % code


class RejectCode(enum.IntEnum):
    """Unauthenticated answer to a preamble or act one, sent instead of act two."""

    UNSUPPORTED_VERSION = 1  # the server does not speak the agent's version
    SERVER_KEY_MISMATCH = 2  # act one was not made for any key this server holds
    BUSY = 3  # too many handshakes in progress or penalised source: retry later
    SHUTTING_DOWN = 4  # the server is stopping: retry later


class Frame(NamedTuple):
    type: int
    stream_id: int
    payload: bytes


class Preamble(NamedTuple):
    version: int
    max_version: int
    flags: int


def encode_preamble(version=WIRE_VERSION, max_version=WIRE_VERSION, flags=0):
    return MAGIC + bytes([version, max_version]) + _U16.pack(flags)


def parse_preamble(data):
    """Check the 8 cleartext bytes an agent sends first. Version support is the caller's call."""
    if len(data) != PREAMBLE_SIZE or data[:4] != MAGIC:
        raise ProtocolError("bad magic %r" % bytes(data[:4]))
    preamble = Preamble(data[4], data[5], _U16.unpack_from(data, 6)[0])
    if preamble.max_version < preamble.version:
        raise ProtocolError("max_version %d below version %d" % preamble[1::-1])
    if preamble.flags:
        raise ProtocolError("reserved preamble flags 0x%04x set" % preamble.flags)
    return preamble


def prologue(preamble_bytes):
    """Binding the preamble into the Noise prologue makes a tampered preamble fail act one."""
    return PROLOGUE_LABEL + bytes(preamble_bytes)


def encode_reject(code, server_max_version=WIRE_VERSION):
    """MAGIC | 0x00 | server max version | u16 code. Starts with 'd', act two with 0x00."""
    return MAGIC + bytes([0, server_max_version]) + _U16.pack(code)


def parse_reject(data):
    """-> (server_max_version, RejectCode or int)."""
    if len(data) != PREAMBLE_SIZE or data[:4] != MAGIC or data[4] != 0:
        raise ProtocolError("malformed reject %r" % bytes(data))
    code = _U16.unpack_from(data, 6)[0]
    try:
        code = RejectCode(code)
    except ValueError:
        pass
    return data[5], code


def encode_frame(ftype, stream_id=0, payload=b""):
    return _HEADER.pack(ftype, 0, stream_id, len(payload)) + payload


# Stream-id class and payload-size rules per frame type: (needs stream id, min, max).
_RULES = {
    FrameType.CONFIG: (False, 2, MAX_CONFIG_SIZE),
    FrameType.OK: (False, 2, MAX_CONFIG_SIZE),
    FrameType.ERROR: (False, 2, 2 + MAX_REASON_SIZE),
    FrameType.OPEN: (True, 0, MAX_OPEN_INFO_SIZE),
    FrameType.DATA: (True, 1, MAX_DATA_PAYLOAD),  # empty DATA would be a free flood
    FrameType.FIN: (True, 0, 0),
    FrameType.RESET: (True, 2, 2),
    FrameType.WINDOW: (True, 4, 4),
    FrameType.PING: (False, PING_SIZE, PING_SIZE),
    FrameType.PONG: (False, PING_SIZE, PING_SIZE),
    FrameType.GOAWAY: (False, 2, 2 + 4 + MAX_REASON_SIZE),  # u32 retry_after if negotiated
}
_RULES_BY_INT = {int(k): v for k, v in _RULES.items()}
_DATA = int(FrameType.DATA)
_new_frame = tuple.__new__  # Frame(...) without the Python-level __new__ NamedTuple makes


def decode_frames(plaintext):
    """Split one record's plaintext into frames; frames never span records."""
    view = memoryview(plaintext)
    offset, end = 0, len(plaintext)
    if end == 0:
        raise ProtocolError("empty record")
    if end > FRAME_HEADER_SIZE and plaintext[0] == _DATA:  # the common record: one DATA frame
        ftype, flags, stream_id, length = _HEADER.unpack_from(plaintext)
        if not flags and stream_id and length == end - FRAME_HEADER_SIZE <= MAX_DATA_PAYLOAD:
            return [_new_frame(Frame, (_DATA, stream_id, view[FRAME_HEADER_SIZE:]))]
    frames = []
    while offset < end:
        if end - offset < FRAME_HEADER_SIZE:
            raise ProtocolError("%d trailing bytes after the last frame" % (end - offset))
        ftype, flags, stream_id, length = _HEADER.unpack_from(plaintext, offset)
        offset += FRAME_HEADER_SIZE
        if offset + length > end:
            raise ProtocolError("frame length %d overruns the record" % length)
        rule = _RULES_BY_INT.get(ftype)
        if rule is None:
            raise ProtocolError("unknown frame type 0x%02x" % ftype)
        if flags:
            raise ProtocolError("reserved flags 0x%02x on %s" % (flags, FrameType(ftype).name))
        needs_stream, low, high = rule
        if needs_stream != (stream_id != 0):
            raise ProtocolError(
                "%s on stream %d" % (FrameType(ftype).name, stream_id)
            )
        if not low <= length <= high:
            raise ProtocolError(
                "%s payload of %d bytes (allowed %d-%d)" % (FrameType(ftype).name, length, low, high)
            )
        payload = view[offset : offset + length]  # DATA stays a view: bulk bytes are not copied
        frames.append(Frame(ftype, stream_id, payload if ftype == FrameType.DATA else bytes(payload)))
        offset += length
    return frames


def encode_json(obj, limit):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > limit:
        raise ValueError("JSON payload of %d bytes exceeds %d" % (len(data), limit))
    return data


def decode_json(payload, what):
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: json.loads recurses per nesting level, and 4 KiB of "[" nests
        # deeper than Python's recursion limit.
        raise ProtocolError("%s is not UTF-8 JSON" % what) from None
    if not isinstance(obj, dict):
        raise ProtocolError("%s is not a JSON object" % what)
    return obj


def encode_code_reason(code, reason=""):
    """ERROR and GOAWAY payload: u16 code + UTF-8 reason, cut to MAX_REASON_SIZE bytes."""
    raw = reason.encode("utf-8")[:MAX_REASON_SIZE]
    return _U16.pack(code) + raw


def decode_code_reason(payload):
    code = _U16.unpack_from(payload)[0]
    return code, bytes(payload[2:]).decode("utf-8", "replace")


def encode_goaway(code, retry_after, reason=""):
    """GOAWAY payload once the "retry-after" feature is in use: u16 code, u32 seconds the
    peer should wait before it reconnects (0: no wait asked), UTF-8 reason."""
    return _U16.pack(code) + _U32.pack(retry_after) + reason.encode("utf-8")[:MAX_REASON_SIZE]


def decode_goaway(payload):
    """(code, reason, retry_after) of a GOAWAY with the "retry-after" layout."""
    if len(payload) < 6:
        raise ProtocolError("GOAWAY of %d bytes has no retry_after field" % len(payload))
    code, retry_after = _U16.unpack_from(payload)[0], _U32.unpack_from(payload, 2)[0]
    return code, bytes(payload[6:]).decode("utf-8", "replace"), retry_after


def encode_u16(value):
    return _U16.pack(value)


def decode_u16(payload):
    return _U16.unpack(payload)[0]


def encode_u32(value):
    return _U32.pack(value)


def decode_u32(payload):
    return _U32.unpack(payload)[0]
