"""diglett.wire: preamble, reject, frame encoding and the decode_frames rules (docs/protocol.md; test plan A4, A6c).

Why ~440 lines: one subject, the frame codec: every frame type's layout, limits and errors, each
test alone.
"""

import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from diglett import wire
from diglett.wire import ErrorCode, Frame, FrameType, ProtocolError

HEADER = struct.Struct(">BBIH")

# Stream-id class and payload-size bounds per type, restated from the spec table so a
# change in wire.py's rules table is caught here rather than silently agreed with.
SPEC = {
    FrameType.CONFIG: (False, 2, 4096),
    FrameType.OK: (False, 2, 4096),
    FrameType.ERROR: (False, 2, 258),
    FrameType.OPEN: (True, 0, 512),
    FrameType.DATA: (True, 1, 65527),
    FrameType.FIN: (True, 0, 0),
    FrameType.RESET: (True, 2, 2),
    FrameType.WINDOW: (True, 4, 4),
    FrameType.PING: (False, 8, 8),
    FrameType.PONG: (False, 8, 8),
    FrameType.GOAWAY: (False, 2, 262),  # + u32 retry_after when the feature is in use
}
STREAM_TYPES = [t for t, (needs, _, _) in SPEC.items() if needs]
SESSION_TYPES = [t for t, (needs, _, _) in SPEC.items() if not needs]
KNOWN_TYPES = {int(t) for t in FrameType}


def raw_frame(ftype, flags=0, stream_id=0, length=None, payload=b""):
    """A frame header built by hand, so the length may lie about the payload."""
    if length is None:
        length = len(payload)
    return HEADER.pack(ftype, flags, stream_id, length) + payload


def valid_payload(ftype, size):
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


# ----- constants -------------------------------------------------------------------------
def test_limits_follow_the_spec():
    assert wire.FRAME_HEADER_SIZE == 8
    assert wire.MAX_RECORD_PLAINTEXT == 65535
    assert wire.MAX_DATA_PAYLOAD == 65527
    assert wire.MAX_WINDOW == 2**31 - 1
    assert wire.MAX_STREAM_ID == 2**32 - 1
    assert [int(t) for t in FrameType] == list(range(1, 12))
    assert [int(c) for c in ErrorCode][:17] == list(range(17))
    assert ErrorCode.FLOW_CONTROL_ERROR == 3 and ErrorCode.REFUSED_STREAM == 5


def test_code_name():
    assert wire.code_name(3) == "FLOW_CONTROL_ERROR"
    assert wire.code_name(999) == "UNKNOWN_999"


def test_protocol_error_code_defaults_to_protocol_error():
    assert ProtocolError("x").code == ErrorCode.PROTOCOL_ERROR
    assert ProtocolError("x", ErrorCode.FLOW_CONTROL_ERROR).code == ErrorCode.FLOW_CONTROL_ERROR


# ----- frames: round trips -----------------------------------------------------------------
@st.composite
def frames(draw):
    ftype = draw(st.sampled_from(list(FrameType)))
    needs_stream, low, high = SPEC[ftype]
    stream_id = draw(st.integers(1, wire.MAX_STREAM_ID)) if needs_stream else 0
    # Big DATA payloads are slow to draw byte by byte; size + a repeated pattern covers them.
    if high > 600:
        size = draw(st.one_of(st.integers(low, 600), st.integers(low, high)))
        payload = draw(st.binary(min_size=1, max_size=1)) * size if size > 600 else draw(
            st.binary(min_size=size, max_size=size))
    else:
        payload = draw(st.binary(min_size=low, max_size=high))
    return Frame(int(ftype), stream_id, payload)


@given(frames())
def test_single_frame_round_trip(frame):
    encoded = wire.encode_frame(frame.type, frame.stream_id, frame.payload)
    assert len(encoded) == wire.FRAME_HEADER_SIZE + len(frame.payload)
    assert encoded[1] == 0  # flags are always zero in v2
    assert wire.decode_frames(encoded) == [frame]


@given(st.lists(frames(), min_size=1, max_size=8))
def test_many_frames_round_trip_in_one_record(frame_list):
    encoded = b"".join(wire.encode_frame(*f) for f in frame_list)
    if len(encoded) > wire.MAX_RECORD_PLAINTEXT:
        return  # a record cannot carry them; the sender splits (tested in test_protocol)
    decoded = wire.decode_frames(encoded)
    assert decoded == frame_list
    # DATA payloads are views into the (immutable) record plaintext, so bulk bytes are not
    # copied; every other payload is bytes of its own.
    assert all(type(f.payload) is (memoryview if f.type == FrameType.DATA else bytes)
               for f in decoded)


def test_every_type_round_trips_at_its_bounds():
    for ftype, (needs_stream, low, high) in SPEC.items():
        for size in {low, high}:
            frame = Frame(int(ftype), 7 if needs_stream else 0, valid_payload(ftype, size))
            assert wire.decode_frames(wire.encode_frame(*frame)) == [frame], ftype.name


def test_header_layout_is_big_endian():
    encoded = wire.encode_frame(FrameType.WINDOW, 0x01020304, b"\x00\x00\x10\x00")
    assert encoded == b"\x08\x00\x01\x02\x03\x04\x00\x04\x00\x00\x10\x00"


def test_decode_accepts_bytearray_and_memoryview():
    encoded = wire.encode_frame(FrameType.DATA, 1, b"abc")
    expected = [Frame(FrameType.DATA, 1, b"abc")]
    assert wire.decode_frames(bytearray(encoded)) == expected
    assert wire.decode_frames(memoryview(encoded)) == expected


# ----- frames: arbitrary bytes -------------------------------------------------------------
@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    try:
        decoded = wire.decode_frames(data)
    except ProtocolError:
        return
    # Whatever is accepted re-encodes to the very same bytes: nothing is skipped or guessed.
    assert b"".join(wire.encode_frame(*f) for f in decoded) == data


@settings(max_examples=500)
@given(st.lists(frames(), min_size=1, max_size=4), st.data())
def test_mutated_valid_records_raise_only_protocol_error(frame_list, data):
    encoded = bytearray(b"".join(wire.encode_frame(*f) for f in frame_list))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    try:
        wire.decode_frames(bytes(encoded[:cut]))
    except ProtocolError:
        pass


# ----- frames: every rule of decode_frames ---------------------------------------------------
def test_empty_record_is_an_error():
    with pytest.raises(ProtocolError, match="empty record"):
        wire.decode_frames(b"")


@pytest.mark.parametrize("ftype", STREAM_TYPES, ids=lambda t: t.name)
def test_stream_types_need_a_stream_id(ftype):
    _, low, _ = SPEC[ftype]
    with pytest.raises(ProtocolError, match="on stream 0"):
        wire.decode_frames(raw_frame(ftype, stream_id=0, payload=b"\x00\x00\x00\x01"[:low]))


@pytest.mark.parametrize("ftype", SESSION_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("stream_id", [1, 2**32 - 1])
def test_session_types_need_stream_zero(ftype, stream_id):
    _, low, _ = SPEC[ftype]
    with pytest.raises(ProtocolError, match="on stream %d" % stream_id):
        wire.decode_frames(raw_frame(ftype, stream_id=stream_id, payload=b"{}" + b"\x00" * (low - 2)))


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_payload_size_bounds(ftype):
    needs_stream, low, high = SPEC[ftype]
    sid = 5 if needs_stream else 0
    for size in (low - 1, high + 1):
        if size < 0:
            continue
        frame = raw_frame(ftype, stream_id=sid, payload=b"\x01" * size)
        with pytest.raises(ProtocolError, match="payload of %d bytes" % size):
            wire.decode_frames(frame)
    for size in (low, high):
        assert wire.decode_frames(raw_frame(ftype, stream_id=sid, payload=b"\x01" * size))


def test_named_payload_cases_from_a4():
    # WINDOW with a 3-byte payload, RESET with 1 byte, empty DATA, CONFIG of 4097 bytes.
    for frame in (
        raw_frame(FrameType.WINDOW, stream_id=1, payload=b"\x00\x00\x01"),
        raw_frame(FrameType.RESET, stream_id=1, payload=b"\x01"),
        raw_frame(FrameType.DATA, stream_id=1),
        raw_frame(FrameType.CONFIG, payload=b"{" + b" " * 4095 + b"}"),
    ):
        with pytest.raises(ProtocolError):
            wire.decode_frames(frame)


@pytest.mark.parametrize("ftype", [0x00, 0x0C, 0x7F, 0xFF])
def test_unknown_type(ftype):
    with pytest.raises(ProtocolError, match="unknown frame type 0x%02x" % ftype):
        wire.decode_frames(raw_frame(ftype, stream_id=1, payload=b"x"))


@pytest.mark.parametrize("flags", [0x01, 0x80, 0xFF])
@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.PING], ids=lambda t: t.name)
def test_reserved_flags(ftype, flags):
    needs_stream, low, _ = SPEC[ftype]
    frame = raw_frame(ftype, flags=flags, stream_id=1 if needs_stream else 0, payload=b"p" * low)
    with pytest.raises(ProtocolError, match="reserved flags"):
        wire.decode_frames(frame)


def test_frame_length_overrunning_the_record():
    with pytest.raises(ProtocolError, match="overruns"):
        wire.decode_frames(raw_frame(FrameType.DATA, stream_id=1, length=4, payload=b"abc"))
    good = wire.encode_frame(FrameType.DATA, 1, b"abc")
    with pytest.raises(ProtocolError, match="overruns"):
        wire.decode_frames(good + raw_frame(FrameType.DATA, stream_id=1, length=100, payload=b"x"))


@pytest.mark.parametrize("extra", range(1, 8))
def test_trailing_bytes_after_the_last_frame(extra):
    good = wire.encode_frame(FrameType.DATA, 1, b"abc")
    with pytest.raises(ProtocolError, match="%d trailing bytes" % extra):
        wire.decode_frames(good + b"\x05" * extra)


def test_a_bad_frame_anywhere_rejects_the_whole_record():
    good = wire.encode_frame(FrameType.DATA, 1, b"abc")
    bad = raw_frame(FrameType.FIN, stream_id=0)
    for record in (bad + good, good + bad, good + bad + good):
        with pytest.raises(ProtocolError):
            wire.decode_frames(record)


def test_error_messages_name_the_type():
    with pytest.raises(ProtocolError, match="WINDOW payload of 3 bytes"):
        wire.decode_frames(raw_frame(FrameType.WINDOW, stream_id=1, payload=b"abc"))
    with pytest.raises(ProtocolError, match="DATA on stream 0"):
        wire.decode_frames(raw_frame(FrameType.DATA, stream_id=0, payload=b"abc"))


# ----- preamble and reject -----------------------------------------------------------------
def test_preamble_layout_and_round_trip():
    data = wire.encode_preamble()
    assert data == b"digl\x02\x02\x00\x00"
    assert wire.parse_preamble(data) == wire.Preamble(2, 2, 0)
    assert wire.parse_preamble(wire.encode_preamble(2, 3)) == (2, 3, 0)
    assert wire.parse_preamble(bytearray(data)) == (2, 2, 0)


@given(st.integers(0, 255), st.integers(0, 255))
def test_preamble_versions(version, max_version):
    data = wire.encode_preamble(version, max_version)
    if max_version < version:
        with pytest.raises(ProtocolError, match="max_version %d below version %d"
                           % (max_version, version)):
            wire.parse_preamble(data)
    else:
        assert wire.parse_preamble(data) == (version, max_version, 0)


@pytest.mark.parametrize("data", [
    b"DIGL\x02\x02\x00\x00",
    b"digk\x02\x02\x00\x00",
    b"GET / HT",
    b"\x16\x03\x01\x02\x00\x01\x00\x01",  # TLS ClientHello
    b"digl\x02\x02\x00",  # 7 bytes
    b"digl\x02\x02\x00\x00\x00",  # 9 bytes
    b"",
])
def test_preamble_bad_magic_or_size(data):
    with pytest.raises(ProtocolError, match="bad magic"):
        wire.parse_preamble(data)


@pytest.mark.parametrize("flags", [1, 0x8000, 0xFFFF])
def test_preamble_flags_must_be_zero(flags):
    with pytest.raises(ProtocolError, match="flags"):
        wire.parse_preamble(wire.encode_preamble(flags=flags))


@given(st.binary(max_size=12))
def test_preamble_arbitrary_bytes(data):
    try:
        wire.parse_preamble(data)
    except ProtocolError:
        pass


def test_prologue_binds_the_preamble():
    preamble = wire.encode_preamble()
    assert wire.prologue(preamble) == b"diglett-wire" + preamble
    assert wire.prologue(bytearray(preamble)) == b"diglett-wire" + preamble


def test_reject_layout_and_round_trip():
    data = wire.encode_reject(wire.RejectCode.UNSUPPORTED_VERSION)
    assert data == b"digl\x00\x02\x00\x01"  # the advisory reject (docs/protocol.md)
    assert wire.parse_reject(data) == (2, wire.RejectCode.UNSUPPORTED_VERSION)
    for code in wire.RejectCode:
        server_max, parsed = wire.parse_reject(wire.encode_reject(code, 7))
        assert server_max == 7 and parsed is code


def test_reject_unknown_code_is_kept_as_int():
    server_max, code = wire.parse_reject(b"digl\x00\x02\x12\x34")
    assert code == 0x1234 and not isinstance(code, wire.RejectCode)


def test_reject_is_told_apart_from_act_two_and_a_preamble():
    reject = wire.encode_reject(wire.RejectCode.BUSY)
    assert reject[0] != 0  # act two starts with 0x00
    assert reject[4] == 0  # a preamble's version byte is never 0


@pytest.mark.parametrize("data", [
    b"digl\x02\x02\x00\x01",  # a preamble, not a reject: byte 4 must be zero
    b"xigl\x00\x02\x00\x01",
    b"digl\x00\x02\x00",
    b"digl\x00\x02\x00\x01\x00",
    b"",
])
def test_malformed_reject(data):
    with pytest.raises(ProtocolError, match="malformed reject"):
        wire.parse_reject(data)


# ----- payload helpers ---------------------------------------------------------------------
def test_encode_json_is_compact_and_sorted():
    assert wire.encode_json({"b": 1, "a": [1, 2]}, 100) == b'{"a":[1,2],"b":1}'


def test_encode_json_enforces_the_limit():
    obj = {"subdomain": "x" * 100}
    size = len(json.dumps(obj, separators=(",", ":")))
    assert len(wire.encode_json(obj, size)) == size
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_json(obj, size - 1)


@given(st.dictionaries(st.text(max_size=10), st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20),
    st.lists(st.integers(), max_size=4)), max_size=6))
def test_json_round_trip(obj):
    assert wire.decode_json(wire.encode_json(obj, 10**6), "CONFIG") == obj


@pytest.mark.parametrize("payload", [
    b"\xff\xfe", b"{", b"", b"nope", b'{"a":1', b"\xc3\x28",
])
def test_decode_json_rejects_garbage(payload):
    with pytest.raises(ProtocolError, match="CONFIG is not UTF-8 JSON"):
        wire.decode_json(payload, "CONFIG")


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"x"', b"null", b"true"])
def test_decode_json_wants_an_object(payload):
    with pytest.raises(ProtocolError, match="OK is not a JSON object"):
        wire.decode_json(payload, "OK")


@pytest.mark.parametrize("payload", [
    b"[" * 2000 + b"]" * 2000,  # 4000 bytes: fits a CONFIG frame
    b'{"a":' * 680 + b"1" + b"}" * 680,
    b"[" * 4096,
])
def test_decode_json_deep_nesting_is_a_protocol_error(payload):
    # json.loads recurses per nesting level; a 4 KiB CONFIG can nest deeper than Python's
    # recursion limit, which must not escape as RecursionError.
    try:
        wire.decode_json(payload, "CONFIG")
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_decode_json_arbitrary_bytes(payload):
    try:
        assert isinstance(wire.decode_json(payload, "OPEN"), dict)
    except ProtocolError:
        pass


def test_decode_json_accepts_memoryview():
    assert wire.decode_json(memoryview(b'{"remote":"1.2.3.4:5"}'), "OPEN") == {"remote": "1.2.3.4:5"}


@given(st.integers(0, 0xFFFF), st.text(max_size=300))
def test_code_reason_round_trip(code, reason):
    payload = wire.encode_code_reason(code, reason)
    assert len(payload) <= 2 + wire.MAX_REASON_SIZE
    got_code, got_reason = wire.decode_code_reason(payload)
    assert got_code == code
    raw = reason.encode("utf-8")
    if len(raw) <= wire.MAX_REASON_SIZE:
        assert got_reason == reason
    else:  # cut at a byte boundary; a split character decodes as U+FFFD, never raises
        assert got_reason.encode("utf-8", "replace").startswith(
            raw[:wire.MAX_REASON_SIZE].decode("utf-8", "ignore").encode())


def test_code_reason_layout():
    assert wire.encode_code_reason(ErrorCode.BAD_CONFIG, "no") == b"\x00\x10no"
    assert wire.decode_code_reason(b"\x00\x01") == (1, "")
    assert wire.decode_code_reason(b"\x00\x01\xff") == (1, "\ufffd")


def test_code_reason_fits_error_and_goaway_frames():
    payload = wire.encode_code_reason(1, "é" * 300)
    for ftype in (FrameType.ERROR, FrameType.GOAWAY):
        assert wire.decode_frames(wire.encode_frame(ftype, 0, payload))
    longest = wire.encode_goaway(17, 2**32 - 1, "é" * 300)
    frame, = wire.decode_frames(wire.encode_frame(FrameType.GOAWAY, 0, longest))
    code, reason, retry_after = wire.decode_goaway(frame.payload)
    assert (code, retry_after, len(reason.encode())) == (17, 2**32 - 1, wire.MAX_REASON_SIZE)


@given(st.integers(0, 0xFFFF))
def test_u16_round_trip(value):
    assert wire.decode_u16(wire.encode_u16(value)) == value
    assert len(wire.encode_u16(value)) == 2


@given(st.integers(0, 0xFFFFFFFF))
def test_u32_round_trip(value):
    assert wire.decode_u32(wire.encode_u32(value)) == value
    assert wire.encode_u32(value) == value.to_bytes(4, "big")


def test_wire_imports_only_the_standard_library():
    import ast
    import sys
    tree = ast.parse(open(wire.__file__).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)
