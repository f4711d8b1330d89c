"""diglett.protocol.Session over an in-memory link: streams, credit, scheduling, faults.

Two real sessions (server and agent) with real TransportCipher records, joined by a fake
link that moves ``data_to_send()`` of one into ``receive_data()`` of the other, optionally
one byte at a time (test plan A4, A5, A6b, A7 in docs/testplan.md). Peer faults
are injected by a RawPeer that holds the other end's ciphers and seals hand-built frames.

Why ~1270 lines: one subject, the multiplexer state machine (protocol.py): its stream states,
windows and flood guards are tested together, as they change together.
"""

import json

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, initialize, invariant, rule,
)

from diglett import crypto, protocol, wire
from diglett.protocol import (
    AGENT, SERVER, Accepted, ConfigReceived, DataReceived, GoAwayReceived, PongReceived,
    Refused, Session, StreamEnded, StreamOpened, StreamReset, WindowUpdated,
)
from diglett.wire import ErrorCode, Frame, FrameType, ProtocolError

KEY_S2A = b"\x11" * 32  # server -> agent direction
KEY_A2S = b"\x33" * 32  # agent -> server direction
CHAINING_KEY = b"\x22" * 32
WINDOW = 64 * 1024
MAX_RECORD = crypto.RECORD_HEADER_SIZE + wire.MAX_RECORD_PLAINTEXT + crypto.TAG_SIZE


def cipher(key):
    return crypto.TransportCipher(key, CHAINING_KEY, crypto.get_backend())


def drain(session):
    """Everything the session has to send, over as many data_to_send calls as it takes."""
    out = b""
    while True:
        chunk = session.data_to_send()
        if not chunk:
            return out
        out += chunk


def feed(session, data, one_byte=False):
    if not one_byte:
        return session.receive_data(data)
    events = []
    for i in range(len(data)):
        events += session.receive_data(data[i:i + 1])
    return events


def open_records(recv_cipher, data):
    """Decrypt a byte string of whole records -> list of plaintexts."""
    plaintexts, offset = [], 0
    while offset < len(data):
        length = recv_cipher.open_length(data[offset:offset + crypto.RECORD_HEADER_SIZE])
        offset += crypto.RECORD_HEADER_SIZE
        plaintexts.append(recv_cipher.open_body(data[offset:offset + length + crypto.TAG_SIZE]))
        offset += length + crypto.TAG_SIZE
    return plaintexts


def split_records(recv_cipher, data):
    """Cut a byte string of whole records into the records (decrypting to find the ends)."""
    records, offset = [], 0
    while offset < len(data):
        header = data[offset:offset + crypto.RECORD_HEADER_SIZE]
        end = offset + crypto.RECORD_HEADER_SIZE + recv_cipher.open_length(header) + crypto.TAG_SIZE
        recv_cipher.open_body(data[offset + crypto.RECORD_HEADER_SIZE:end])
        records.append(data[offset:end])
        offset = end
    assert offset == len(data)
    return records


class Link:
    """A server and an agent session joined in memory."""

    def __init__(self, window=WINDOW, max_streams=protocol.DEFAULT_MAX_STREAMS, one_byte=False,
                 configure=True):
        self.server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S), window=window)
        self.agent = Session(AGENT, cipher(KEY_A2S), cipher(KEY_S2A), max_streams=max_streams)
        self.one_byte = one_byte
        # Spies: decrypt every record in flight so tests can look at the frames.
        self._spy = {SERVER: cipher(KEY_S2A), AGENT: cipher(KEY_A2S)}
        self.records = {SERVER: [], AGENT: []}  # plaintexts sent by each side
        if configure:
            self.agent.send_config({"subdomain": "foo"})
            assert self.to_server() == [ConfigReceived({"subdomain": "foo"})]
            self.server.accept({"window": window, "subdomain": "foo"})
            assert self.to_agent() == [Accepted({"window": window, "subdomain": "foo"})]

    def _move(self, src, dst, limit):
        data = drain(src) if limit is None else src.data_to_send(limit)
        self.records[src.role] += open_records(self._spy[src.role], data)
        return feed(dst, data, self.one_byte)

    def to_agent(self, limit=None):
        return self._move(self.server, self.agent, limit)

    def to_server(self, limit=None):
        return self._move(self.agent, self.server, limit)

    def frames(self, role):
        """Frames sent by ``role`` so far, record boundaries flattened."""
        return [f for p in self.records[role] for f in wire.decode_frames(p)]

    def open(self, info=None):
        stream_id = self.server.open_stream(info)
        assert self.to_agent() == [StreamOpened(stream_id, info or {})]
        return stream_id


class RawPeer:
    """The other end of one session, writing hand-built frames with the real record cipher."""

    def __init__(self, session_role):
        server_side = session_role == SERVER
        self.send = cipher(KEY_A2S if server_side else KEY_S2A)
        self.recv = cipher(KEY_S2A if server_side else KEY_A2S)

    def record(self, *frames):
        return self.send.seal(b"".join(
            f if isinstance(f, bytes) else wire.encode_frame(*f) for f in frames))

    def read(self, session):
        return [f for p in open_records(self.recv, drain(session)) for f in wire.decode_frames(p)]


def raw_server(guard=None):
    server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S), window=WINDOW, guard=guard)
    peer = RawPeer(SERVER)
    server.receive_data(peer.record(Frame(FrameType.CONFIG, 0, b"{}")))
    server.accept({"window": WINDOW})
    peer.read(server)
    return server, peer


def raw_agent(max_streams=protocol.DEFAULT_MAX_STREAMS, window=WINDOW, guard=None):
    agent = Session(AGENT, cipher(KEY_A2S), cipher(KEY_S2A), max_streams=max_streams,
                    guard=guard)
    peer = RawPeer(AGENT)
    ok = wire.encode_json({"window": window}, wire.MAX_CONFIG_SIZE)
    assert agent.receive_data(peer.record(Frame(FrameType.OK, 0, ok))) == [Accepted({"window": window})]
    return agent, peer


def OPEN(stream_id, info=b""):
    return Frame(FrameType.OPEN, stream_id, info)


def DATA(stream_id, payload):
    return Frame(FrameType.DATA, stream_id, payload)


def FIN(stream_id):
    return Frame(FrameType.FIN, stream_id, b"")


def RESET(stream_id, code=ErrorCode.CONNECT_FAILED):
    return Frame(FrameType.RESET, stream_id, wire.encode_u16(code))


def WINDOW_(stream_id, increment):
    return Frame(FrameType.WINDOW, stream_id, wire.encode_u32(increment))


# ----- configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("one_byte", [False, True])
def test_config_and_accept(one_byte):
    link = Link(window=12345, one_byte=one_byte, configure=False)
    link.agent.send_config({"subdomain": "foo", "features": []})
    assert link.to_server() == [ConfigReceived({"subdomain": "foo", "features": []})]
    link.server.accept({"window": 12345, "host": "foo.example"})
    assert link.to_agent() == [Accepted({"window": 12345, "host": "foo.example"})]
    assert link.agent.window == 12345  # learnt from OK, not the constructor default
    assert link.server.configured and link.agent.configured
    stream_id = link.open()
    assert link.agent.send_credit(stream_id) == 12345
    assert link.server.send_credit(stream_id) == 12345


def test_refuse():
    link = Link(configure=False)
    link.agent.send_config({"subdomain": "taken"})
    link.to_server()
    link.server.refuse(ErrorCode.NAME_IN_USE, "name in use")
    assert link.to_agent() == [Refused(ErrorCode.NAME_IN_USE, "name in use")]


@pytest.mark.parametrize("window", [0, -1, 2**31, None, "65536", 1.5])
def test_ok_with_a_bad_window(window):
    agent = Session(AGENT, cipher(KEY_A2S), cipher(KEY_S2A))
    info = {} if window is None else {"window": window}
    with pytest.raises(ProtocolError, match="window"):
        agent.receive_data(RawPeer(AGENT).record(Frame(FrameType.OK, 0, json.dumps(info).encode())))


@pytest.mark.parametrize("role, frame", [
    (SERVER, Frame(FrameType.PING, 0, b"12345678")),
    (SERVER, Frame(FrameType.OK, 0, b"{}")),
    (SERVER, Frame(FrameType.ERROR, 0, b"\x00\x01")),
    (AGENT, Frame(FrameType.CONFIG, 0, b"{}")),
    (AGENT, Frame(FrameType.PONG, 0, b"12345678")),
    (AGENT, OPEN(1)),
    (AGENT, DATA(1, b"x")),
    (SERVER, DATA(1, b"x")),
    (SERVER, Frame(FrameType.CONFIG, 0, b"[]")),
    (SERVER, Frame(FrameType.CONFIG, 0, b"\xff{}")),
])
def test_bad_first_frame(role, frame):
    session = Session(role, cipher(KEY_S2A if role == SERVER else KEY_A2S),
                      cipher(KEY_A2S if role == SERVER else KEY_S2A))
    with pytest.raises(ProtocolError):
        session.receive_data(RawPeer(role).record(frame))


def test_goaway_before_config_is_reported():
    server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S))
    record = RawPeer(SERVER).record(Frame(FrameType.GOAWAY, 0, wire.encode_code_reason(15, "bye")))
    assert server.receive_data(record) == [GoAwayReceived(15, "bye")]
    assert not server.configured


@pytest.mark.parametrize("frame", [
    Frame(FrameType.CONFIG, 0, b"{}"),  # CONFIG twice
    Frame(FrameType.OK, 0, b'{"window":1}'),  # OK sent by an agent
    Frame(FrameType.ERROR, 0, b"\x00\x01"),
])
def test_handshake_frames_after_config_are_errors_on_the_server(frame):
    server, peer = raw_server()
    with pytest.raises(ProtocolError, match="unexpected"):
        server.receive_data(peer.record(frame))


@pytest.mark.parametrize("frame", [
    Frame(FrameType.OK, 0, b'{"window":1}'),
    Frame(FrameType.ERROR, 0, b"\x00\x01"),
    Frame(FrameType.CONFIG, 0, b"{}"),
])
def test_handshake_frames_after_ok_are_errors_on_the_agent(frame):
    agent, peer = raw_agent()
    with pytest.raises(ProtocolError, match="unexpected"):
        agent.receive_data(peer.record(frame))


# ----- streams and data ------------------------------------------------------------------
def test_open_stream_ids_and_info():
    link = Link()
    assert link.open({"remote": "1.2.3.4:5678"}) == 1
    assert link.open() == 2
    assert link.open({"remote": "[::1]:1"}) == 3
    assert sorted(link.agent.streams) == [1, 2, 3]
    assert link.agent.last_stream_id == 3


@pytest.mark.parametrize("one_byte", [False, True])
def test_data_both_ways_exact_bytes(one_byte):
    link = Link(one_byte=one_byte)
    sid = link.open()
    assert link.server.send_data(sid, b"hello agent")
    assert link.to_agent() == [DataReceived(sid, b"hello agent")]
    assert link.agent.send_data(sid, b"\x00hello server\xff")
    assert link.to_server() == [DataReceived(sid, b"\x00hello server\xff")]


def test_large_data_is_split_into_frames_and_reassembled():
    link = Link(window=300_000)
    sid = link.open()
    blob = bytes(range(256)) * 1000 + b"tail"  # 256004 bytes: several max-size frames
    link.server.send_data(sid, blob)
    events = link.to_agent()
    assert all(isinstance(e, DataReceived) and e.stream_id == sid for e in events)
    assert b"".join(e.data for e in events) == blob
    assert max(len(e.data) for e in events) == wire.MAX_DATA_PAYLOAD


def test_send_data_on_unknown_or_reset_stream_returns_false():
    link = Link()
    assert link.server.send_data(99, b"x") is False
    sid = link.open()
    link.agent.reset_stream(sid, ErrorCode.CONNECT_FAILED)
    assert link.to_server() == [StreamReset(sid, ErrorCode.CONNECT_FAILED)]
    assert link.server.send_data(sid, b"x") is False
    assert link.server.send_credit(sid) == 0


def test_empty_send_data_does_not_break_the_writer():
    link = Link()
    sid = link.open()
    link.server.send_data(sid, b"")
    link.server.send_data(sid, b"after")
    assert link.to_agent() == [DataReceived(sid, b"after")]
    link.server.send_data(sid, b"")
    assert link.to_agent() == []  # nothing, in particular no empty DATA frame
    assert not link.server.has_output


# ----- credit ----------------------------------------------------------------------------
def test_sender_cannot_exceed_the_window():
    link = Link(window=1000)
    sid = link.open()
    with pytest.raises(ValueError, match="exceed"):
        link.server.send_data(sid, b"x" * 1001)
    assert link.server.send_credit(sid) == 1000  # the refused call took no credit
    link.server.send_data(sid, b"x" * 600)
    assert link.server.send_credit(sid) == 400
    with pytest.raises(ValueError):
        link.server.send_data(sid, b"x" * 401)
    link.server.send_data(sid, b"x" * 400)
    assert link.server.send_credit(sid) == 0
    with pytest.raises(ValueError):
        link.server.send_data(sid, b"x")


def test_credit_returns_only_after_acknowledge_at_half_window():
    link = Link(window=1000)
    sid = link.open()
    link.server.send_data(sid, b"a" * 1000)
    assert link.to_agent() == [DataReceived(sid, b"a" * 1000)]
    assert link.to_server() == []  # received is not delivered: no credit back
    assert link.server.send_credit(sid) == 0
    link.agent.acknowledge(sid, 499)
    assert not link.agent.has_output  # below half a window: batched
    assert link.to_server() == []
    link.agent.acknowledge(sid, 1)
    assert link.to_server() == [WindowUpdated(sid)]
    assert link.frames(AGENT)[-1] == WINDOW_(sid, 500)
    assert link.server.send_credit(sid) == 500
    link.agent.acknowledge(sid, 500)
    link.to_server()
    assert link.server.send_credit(sid) == 1000


def test_credit_is_per_direction():
    link = Link(window=100)
    sid = link.open()
    link.server.send_data(sid, b"s" * 100)
    assert link.agent.send_credit(sid) == 100
    link.agent.send_data(sid, b"a" * 100)
    assert link.to_agent() == [DataReceived(sid, b"s" * 100)]
    assert link.to_server() == [DataReceived(sid, b"a" * 100)]


def test_stalled_stream_does_not_stall_others():
    link = Link(window=4096)
    stalled, flowing = link.open(), link.open()
    link.server.send_data(stalled, b"s" * 4096)
    link.to_agent()  # the agent never acknowledges this stream
    for round_ in range(20):
        chunk = bytes([round_]) * 4096
        assert link.server.send_credit(stalled) == 0
        link.server.send_data(flowing, chunk)
        assert link.to_agent() == [DataReceived(flowing, chunk)]
        link.agent.acknowledge(flowing, 4096)
        assert link.to_server() == [WindowUpdated(flowing)]
    assert link.server.send_credit(flowing) == 4096


def _first_record_frames(session, spy):
    data = session.data_to_send(1)  # limit 1: exactly one record
    [plaintext] = open_records(spy, data)
    return wire.decode_frames(plaintext)


def test_round_robin_interleaves_a_queued_stream_with_a_bulk_one():
    server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S), window=300_000)
    spy = cipher(KEY_S2A)
    bulk, interactive = server.open_stream(), server.open_stream()
    for _ in range(200):
        server.send_data(bulk, b"b" * 1000)
    server.send_data(interactive, b"keystroke")
    frames = _first_record_frames(server, spy)
    assert frames[:2] == [OPEN(bulk), OPEN(interactive)]
    assert frames[2] == DATA(bulk, b"b" * 1000)
    assert frames[3] == DATA(interactive, b"keystroke")  # its turn comes right after one bulk frame
    # Queued while the bulk backlog is still going out: in the very next record.
    server.send_data(interactive, b"more")
    frames = _first_record_frames(server, spy)
    assert DATA(interactive, b"more") in frames
    assert frames.index(DATA(interactive, b"more")) <= 1


def test_round_robin_with_full_size_frames():
    server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S), window=300_000)
    spy = cipher(KEY_S2A)
    bulk, interactive = server.open_stream(), server.open_stream()
    server.send_data(bulk, b"B" * 300_000)  # five frames, each filling a record
    _first_record_frames(server, spy)  # the OPENs
    assert [f.type for f in _first_record_frames(server, spy)] == [FrameType.DATA]
    server.send_data(interactive, b"keystroke")
    # The bulk stream is at most one frame ahead: one full record, then the keystroke.
    seen = [_first_record_frames(server, spy) for _ in range(2)]
    assert DATA(interactive, b"keystroke") in seen[0] + seen[1]
    assert server.buffered_output > 2 * wire.MAX_DATA_PAYLOAD  # the backlog was not flushed first


def test_records_never_exceed_the_maximum():
    link = Link(window=200_000)
    ids = [link.open() for _ in range(5)]
    for i, sid in enumerate(ids):
        link.server.send_data(sid, bytes([i]) * (65527 * 2 + 13))
        link.server.send_data(sid, b"x" * 7)
        link.server.ping(b"pingping")
        link.agent.send_data(sid, b"y" * 150_000)
    data = drain(link.server)
    assert len(data) > 5 * 65535
    spy = link._spy[SERVER]
    plaintexts = [p for p in open_records(spy, data)]
    # Every record is header + 1..65535 bytes + tag; re-cut the same bytes to check sizes.
    sizes = [crypto.RECORD_HEADER_SIZE + len(p) + crypto.TAG_SIZE for p in plaintexts]
    assert sum(sizes) == len(data) and max(sizes) <= MAX_RECORD
    assert max(len(p) for p in plaintexts) == wire.MAX_RECORD_PLAINTEXT
    assert all(1 <= len(p) <= wire.MAX_RECORD_PLAINTEXT for p in plaintexts)
    events = link.agent.receive_data(data)
    for i, sid in enumerate(ids):
        got = b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)
        assert got == bytes([i]) * (65527 * 2 + 13) + b"x" * 7


def test_data_to_send_respects_its_limit_roughly():
    link = Link(window=300_000)
    sid = link.open()
    link.server.send_data(sid, b"z" * 300_000)
    first = link.server.data_to_send(100_000)
    assert 100_000 <= len(first) < 100_000 + MAX_RECORD
    assert link.server.has_output


# ----- FIN -------------------------------------------------------------------------------
@pytest.mark.parametrize("first", [SERVER, AGENT])
def test_half_close_either_order(first):
    link = Link()
    sid = link.open()
    a, b = (link.server, link.agent) if first == SERVER else (link.agent, link.server)
    a_to_b, b_to_a = (link.to_agent, link.to_server) if first == SERVER else (link.to_server, link.to_agent)
    a.send_data(sid, b"last words")
    a.send_fin(sid)
    assert a_to_b() == [DataReceived(sid, b"last words"), StreamEnded(sid)]
    assert a.send_data(sid, b"more") is False  # our side is closed
    # The other direction keeps flowing after the half-close.
    assert b.send_data(sid, b"reply")
    assert b_to_a() == [DataReceived(sid, b"reply")]
    assert sid in a.streams and sid in b.streams
    b.send_fin(sid)
    assert b_to_a() == [StreamEnded(sid)]
    assert sid not in a.streams and sid not in b.streams


def test_fin_never_overtakes_queued_data():
    link = Link(window=300_000)
    sid = link.open()
    blob = b"q" * 250_000
    link.server.send_data(sid, blob)
    link.server.send_fin(sid)
    link.server.send_fin(sid)  # a second FIN is ignored
    events = []
    while link.server.has_output:
        events += link.to_agent(limit=1)
    assert events[-1] == StreamEnded(sid)
    assert b"".join(e.data for e in events[:-1]) == blob
    assert [f.type for f in link.frames(SERVER)].count(FrameType.FIN) == 1


def test_fin_simultaneous():
    link = Link()
    sid = link.open()
    link.server.send_fin(sid)
    link.agent.send_fin(sid)
    to_agent = drain(link.server)
    to_server = drain(link.agent)
    assert link.agent.receive_data(to_agent) == [StreamEnded(sid)]
    assert link.server.receive_data(to_server) == [StreamEnded(sid)]
    assert link.server.streams == {} and link.agent.streams == {}


def test_data_after_fin_is_an_error():
    agent, peer = raw_agent()
    agent.receive_data(peer.record(OPEN(1), DATA(1, b"x"), FIN(1)))
    with pytest.raises(ProtocolError, match="after FIN") as info:
        agent.receive_data(peer.record(DATA(1, b"late")))
    assert info.value.code == ErrorCode.STREAM_CLOSED


def test_duplicate_fin_is_ignored():
    agent, peer = raw_agent()
    assert agent.receive_data(peer.record(OPEN(1), FIN(1), FIN(1))) == [
        StreamOpened(1, {}), StreamEnded(1)]


# ----- RESET -----------------------------------------------------------------------------
def test_reset_drops_queued_data():
    link = Link(window=300_000)
    sid, other = link.open(), link.open()
    link.server.send_data(sid, b"d" * 200_000)
    link.server.send_data(other, b"kept")
    link.server.send_fin(sid)
    link.server.reset_stream(sid, ErrorCode.CONNECT_FAILED)
    assert link.server.buffered_output == 4
    assert link.to_agent() == [StreamReset(sid, ErrorCode.CONNECT_FAILED), DataReceived(other, b"kept")]
    assert [f.type for f in link.frames(SERVER)[-2:]] == [FrameType.RESET, FrameType.DATA]
    assert sid not in link.server.streams and sid not in link.agent.streams


def test_reset_after_queued_sends_the_data_first():
    link = Link(window=300_000)
    sid = link.open()
    link.to_agent()
    link.server.send_data(sid, b"q" * 100_000)
    link.server.reset_stream(sid, ErrorCode.STREAM_CLOSED, after_queued=True)
    assert not link.server.send_data(sid, b"more")  # nothing after the reset
    events = link.to_agent()
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"q" * 100_000
    assert events[-1] == StreamReset(sid, ErrorCode.STREAM_CLOSED)
    assert sid not in link.server.streams and sid not in link.agent.streams


def test_reset_after_queued_with_nothing_queued_is_immediate():
    link = Link()
    sid = link.open()
    link.to_agent()
    link.server.reset_stream(sid, ErrorCode.STREAM_CLOSED, after_queued=True)
    assert sid not in link.server.streams
    assert link.to_agent() == [StreamReset(sid, ErrorCode.STREAM_CLOSED)]


def test_reset_after_partial_send():
    link = Link(window=300_000)
    sid = link.open()
    link.server.send_data(sid, b"p" * 200_000)
    events = link.to_agent(limit=1)  # one record went out
    link.server.reset_stream(sid, ErrorCode.INTERNAL_ERROR)
    events += link.to_agent()
    assert events[-1] == StreamReset(sid, ErrorCode.INTERNAL_ERROR)
    assert sum(len(e.data) for e in events[:-1]) < 200_000


def test_reset_twice_and_reset_unknown_send_one_frame():
    link = Link()
    sid = link.open()
    link.agent.reset_stream(sid, 6)
    link.agent.reset_stream(sid, 6)
    link.agent.reset_stream(42, 6)
    assert link.to_server() == [StreamReset(sid, 6)]
    assert [f.type for f in link.frames(AGENT)].count(FrameType.RESET) == 1


# ----- closed and never-opened ids (A7) -----------------------------------------------------
def test_frames_for_closed_streams_are_dropped_on_the_agent():
    agent, peer = raw_agent()
    agent.receive_data(peer.record(OPEN(1), OPEN(2)))
    agent.reset_stream(1, ErrorCode.CONNECT_FAILED)
    assert peer.read(agent) == [RESET(1, ErrorCode.CONNECT_FAILED)]
    late = [DATA(1, b"x")] * 5 + [WINDOW_(1, 10), FIN(1), RESET(1)]
    assert agent.receive_data(peer.record(*late)) == []
    assert agent.receive_data(peer.record(DATA(2, b"ok"))) == [DataReceived(2, b"ok")]
    assert 1 not in agent.streams


def test_frames_for_closed_streams_are_dropped_on_the_server():
    server, peer = raw_server()
    sid = server.open_stream()
    server.reset_stream(sid, ErrorCode.STREAM_CLOSED)
    assert peer.read(server) == [OPEN(sid), RESET(sid, ErrorCode.STREAM_CLOSED)]
    # Five DATA frames and a FIN from an agent that had not yet seen the RESET.
    assert server.receive_data(peer.record(*[DATA(sid, b"y" * 100)] * 5, FIN(sid))) == []
    assert server.receive_data(peer.record(WINDOW_(sid, 5), RESET(sid))) == []
    assert server.streams == {}


def test_frames_after_both_fins_are_dropped():
    link = Link()
    sid = link.open()
    link.server.send_fin(sid)
    link.agent.send_fin(sid)
    link.to_agent()
    link.to_server()
    assert link.server.streams == {}
    peer = RawPeer(SERVER)
    peer.send = link.agent._send_cipher  # write on the agent's direction, in nonce order
    assert link.server.receive_data(peer.record(WINDOW_(sid, 9), RESET(sid))) == []


def test_window_after_reset_then_data_on_other_stream():
    server, peer = raw_server()
    a, b = server.open_stream(), server.open_stream()
    server.send_data(b, b"b" * 10)
    server.reset_stream(a, ErrorCode.CONNECT_FAILED)
    peer.read(server)
    assert server.receive_data(peer.record(WINDOW_(a, 100), WINDOW_(b, 100))) == [WindowUpdated(b)]
    assert server.send_credit(b) == WINDOW - 10 + 100


@pytest.mark.parametrize("frame", [DATA(9999, b"x"), FIN(9999), WINDOW_(9999, 1), RESET(9999)])
@pytest.mark.parametrize("role", [SERVER, AGENT])
def test_frames_for_never_opened_ids_are_errors(role, frame):
    session, peer = raw_server() if role == SERVER else raw_agent()
    if role == SERVER:
        session.open_stream()
    else:
        session.receive_data(peer.record(OPEN(1)))
    with pytest.raises(ProtocolError, match="never opened"):
        session.receive_data(peer.record(frame))


def test_open_from_the_agent_is_an_error():
    server, peer = raw_server()
    with pytest.raises(ProtocolError, match="OPEN from the agent"):
        server.receive_data(peer.record(OPEN(1)))


@pytest.mark.parametrize("second", [1, 2, 3])
def test_reused_or_lower_open_id_is_an_error(second):
    agent, peer = raw_agent()
    agent.receive_data(peer.record(OPEN(3)))
    with pytest.raises(ProtocolError, match="reuses"):
        agent.receive_data(peer.record(OPEN(second)))


def test_reopening_a_closed_id_is_an_error():
    agent, peer = raw_agent()
    agent.receive_data(peer.record(OPEN(1), RESET(1)))
    with pytest.raises(ProtocolError, match="reuses"):
        agent.receive_data(peer.record(OPEN(1)))


def test_open_ids_may_skip():
    agent, peer = raw_agent()
    assert agent.receive_data(peer.record(OPEN(5), OPEN(9))) == [StreamOpened(5, {}), StreamOpened(9, {})]
    # 6..8 were skipped: below last_opened, so treated as closed.
    assert agent.receive_data(peer.record(DATA(7, b"x"))) == []


def test_open_with_bad_info_is_an_error():
    agent, peer = raw_agent()
    with pytest.raises(ProtocolError, match="OPEN"):
        agent.receive_data(peer.record(OPEN(1, b"not json")))


# ----- flow-control violations -------------------------------------------------------------
def test_data_beyond_the_window_is_a_flow_control_error():
    agent, peer = raw_agent(window=1000)
    agent.receive_data(peer.record(OPEN(1), DATA(1, b"a" * 600)))
    assert agent.receive_data(peer.record(DATA(1, b"a" * 400))) == [DataReceived(1, b"a" * 400)]
    with pytest.raises(ProtocolError, match="beyond its window") as info:
        agent.receive_data(peer.record(DATA(1, b"a")))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_data_within_returned_credit_is_fine():
    agent, peer = raw_agent(window=1000)
    agent.receive_data(peer.record(OPEN(1), DATA(1, b"a" * 1000)))
    agent.acknowledge(1, 1000)
    assert peer.read(agent) == [WINDOW_(1, 1000)]
    assert agent.receive_data(peer.record(DATA(1, b"b" * 1000))) == [DataReceived(1, b"b" * 1000)]
    with pytest.raises(ProtocolError) as info:
        agent.receive_data(peer.record(DATA(1, b"c")))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_window_zero_is_a_protocol_error():
    server, peer = raw_server()
    sid = server.open_stream()
    with pytest.raises(ProtocolError, match="WINDOW of 0") as info:
        server.receive_data(peer.record(WINDOW_(sid, 0)))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_window_overflow_is_a_flow_control_error():
    server, peer = raw_server()
    sid = server.open_stream()
    ok = wire.MAX_WINDOW - WINDOW
    assert server.receive_data(peer.record(WINDOW_(sid, ok))) == [WindowUpdated(sid)]
    assert server.send_credit(sid) == wire.MAX_WINDOW
    with pytest.raises(ProtocolError, match="overflows") as info:
        server.receive_data(peer.record(WINDOW_(sid, 1)))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_window_of_u32_max_is_a_flow_control_error():
    server, peer = raw_server()
    sid = server.open_stream()
    with pytest.raises(ProtocolError) as info:
        server.receive_data(peer.record(WINDOW_(sid, 2**32 - 1)))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_acknowledge_zero_never_sends_window_zero():
    for window in (1, 2, 3, 1000):
        link = Link(window=window)
        sid = link.open()
        link.agent.acknowledge(sid, 0)
        link.server.acknowledge(sid, 0)
        assert link.to_server() == [] and link.to_agent() == []


def test_window_of_one():
    link = Link(window=1)
    sid = link.open()
    for byte in b"abc":
        link.server.send_data(sid, bytes([byte]))
        assert link.to_agent() == [DataReceived(sid, bytes([byte]))]
        assert link.server.send_credit(sid) == 0
        link.agent.acknowledge(sid, 1)
        assert link.to_server() == [WindowUpdated(sid)]


# ----- PING, GOAWAY ------------------------------------------------------------------------
def test_ping_is_answered_with_pong():
    link = Link()
    link.server.ping(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert link.to_agent() == []  # answered by the session itself, no event
    assert link.to_server() == [PongReceived(b"\x01\x02\x03\x04\x05\x06\x07\x08")]
    assert link.frames(AGENT)[1:] == [Frame(FrameType.PONG, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08")]
    link.agent.ping(b"agentpng")
    link.to_server()
    assert link.to_agent() == [PongReceived(b"agentpng")]


def test_ping_flood_does_not_grow_the_control_queue():
    agent, peer = raw_agent(guard=protocol.FloodGuard(FakeClock(), ping_limit=0))  # the queue alone
    flood = [Frame(FrameType.PING, 0, i.to_bytes(8, "big")) for i in range(8000)]
    for i in range(0, len(flood), 4000):
        agent.receive_data(peer.record(*flood[i:i + 4000]))  # 4000 * 16 bytes per record
    assert len(agent._control) <= protocol.MAX_PENDING_PONGS
    pongs = peer.read(agent)
    assert 1 <= len(pongs) <= protocol.MAX_PENDING_PONGS
    assert all(f.type == FrameType.PONG for f in pongs)
    # Once the answers are out, new PINGs are answered again.
    agent.receive_data(peer.record(Frame(FrameType.PING, 0, b"again!!!")))
    assert peer.read(agent) == [Frame(FrameType.PONG, 0, b"again!!!")]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_ping_guard_allows_its_limit_per_minute_then_ends_the_session():
    clock = FakeClock()
    agent, peer = raw_agent(guard=protocol.FloodGuard(clock, ping_limit=10))
    pings = [Frame(FrameType.PING, 0, i.to_bytes(8, "big")) for i in range(10)]
    agent.receive_data(peer.record(*pings))  # exactly the limit: fine
    clock.now += 59
    with pytest.raises(ProtocolError) as caught:
        agent.receive_data(peer.record(pings[0]))
    assert caught.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert "more than 10 PINGs in a minute" in str(caught.value)


def test_ping_guard_window_restarts():
    clock = FakeClock()
    agent, peer = raw_agent(guard=protocol.FloodGuard(clock, ping_limit=10))
    for _ in range(5):  # 10 a minute for five minutes is within the limit
        agent.receive_data(peer.record(*[Frame(FrameType.PING, 0, b"12345678")] * 10))
        peer.read(agent)
        clock.now += 60


@pytest.mark.parametrize("frame", [
    FIN(1), RESET(1), WINDOW_(1, 100), Frame(FrameType.PONG, 0, b"12345678")],
    ids=["fin-closed", "reset-closed", "window-closed", "pong"])
def test_frames_that_move_nothing_are_counted(frame):
    clock = FakeClock()
    server, peer = raw_server(guard=protocol.FloodGuard(clock, flood_limit=50))
    for _ in range(2):
        server.open_stream()
    peer.read(server)
    server.receive_data(peer.record(RESET(1)))  # stream 1 is closed from now on
    server.receive_data(peer.record(*[frame] * 50))
    clock.now += 1.0  # a new second: the count starts again
    server.receive_data(peer.record(*[frame] * 50))
    with pytest.raises(ProtocolError) as caught:
        server.receive_data(peer.record(frame))
    assert caught.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_frames_that_move_streams_are_not_counted():
    server, peer = raw_server(guard=protocol.FloodGuard(FakeClock(), flood_limit=1))
    sids = [server.open_stream() for _ in range(100)]
    peer.read(server)
    for sid in sids:  # data, credit, a half-close and a reset of live streams: all progress
        server.receive_data(peer.record(DATA(sid, b"x"), WINDOW_(sid, 10)))
    server.receive_data(peer.record(*[FIN(sid) for sid in sids[:50]]))
    server.receive_data(peer.record(*[RESET(sid) for sid in sids[50:]]))
    server.receive_data(peer.record(Frame(FrameType.PING, 0, b"12345678")))


def test_frames_late_for_streams_closed_here_are_allowed_in_any_number():
    clock = FakeClock()
    server, peer = raw_server(guard=protocol.FloodGuard(clock, flood_limit=10))
    sids = [server.open_stream() for _ in range(100)]
    peer.read(server)
    for sid in sids:  # this side resets 100 streams at once (a backend died)
        server.reset_stream(sid, ErrorCode.CONNECT_FAILED)
    peer.read(server)
    clock.now += 1.5  # the late frames land in the next window
    server.receive_data(peer.record(*[WINDOW_(sid, 100) for sid in sids]))
    server.receive_data(peer.record(*[FIN(sid) for sid in sids]))
    clock.now += 1.0  # the allowance does not carry further: a flood is still a flood
    with pytest.raises(ProtocolError):
        server.receive_data(peer.record(*[FIN(sids[0])] * 11))


def test_guard_limits_of_zero_turn_it_off():
    server, peer = raw_server(guard=protocol.FloodGuard(FakeClock(), 0, 0))
    server.open_stream()
    server.receive_data(peer.record(RESET(1)))
    server.receive_data(peer.record(*[Frame(FrameType.PING, 0, b"12345678")] * 3000))
    for _ in range(10):
        server.receive_data(peer.record(*[FIN(1)] * 3000))


def test_goaway_both_ways():
    link = Link()
    link.server.goaway(ErrorCode.SHUTTING_DOWN, "restarting")
    assert link.to_agent() == [GoAwayReceived(ErrorCode.SHUTTING_DOWN, "restarting")]
    link.agent.goaway(ErrorCode.NO_ERROR)
    assert link.to_server() == [GoAwayReceived(ErrorCode.NO_ERROR, "")]


def negotiated(agent_features, server_knows=True):
    link = Link(configure=False)
    link.agent.send_config({"subdomain": "foo", "features": agent_features})
    link.to_server()
    if not server_knows:  # a server from before the feature: it knows none
        link.server._offered = frozenset()
    link.server.accept({"window": WINDOW, "features": sorted(link.server.offered)})
    assert len(link.to_agent()) == 1
    return link


def test_retry_after_is_a_field_when_both_sides_know_the_feature():
    link = negotiated(["retry-after", "teleport"])  # an unknown feature is ignored
    assert link.server.features == link.agent.features == {"retry-after"}
    link.server.goaway(ErrorCode.KICKED, "kicked by ops", retry_after=30)
    assert link.to_agent() == [GoAwayReceived(ErrorCode.KICKED, "kicked by ops", 30)]
    assert link.frames(SERVER)[-1].payload == wire.encode_goaway(ErrorCode.KICKED, 30,
                                                                 "kicked by ops")


def test_without_the_feature_retry_after_travels_in_the_reason():
    for link in (negotiated([]), negotiated(["retry-after"], server_knows=False)):
        assert link.agent.features == frozenset()
        link.server.goaway(ErrorCode.KICKED, "kicked by ops", retry_after=30)
        assert link.to_agent() == [GoAwayReceived(ErrorCode.KICKED,
                                                  "kicked by ops; retry-after=30", 0)]


def test_a_server_cannot_impose_a_feature_the_agent_did_not_offer():
    agent = Session(AGENT, cipher(KEY_A2S), cipher(KEY_S2A))
    agent.send_config({"subdomain": "foo"})
    ok = {"window": WINDOW, "features": ["retry-after"]}
    agent.receive_data(RawPeer(AGENT).record(Frame(FrameType.OK, 0, wire.encode_json(ok, 4096))))
    assert agent.features == frozenset()


def test_a_goaway_too_short_for_its_retry_after_field_is_a_protocol_error():
    link = negotiated(["retry-after"])
    link.server._control.append(wire.encode_frame(  # as a server that got the layout wrong
        FrameType.GOAWAY, 0, wire.encode_code_reason(ErrorCode.KICKED)))
    with pytest.raises(ProtocolError, match="no retry_after field"):
        link.to_agent()


# ----- max_streams -----------------------------------------------------------------------
def test_agent_max_streams_refuses_with_reset():
    link = Link(max_streams=2)
    a, b = link.open(), link.open()
    c = link.server.open_stream()
    assert link.to_agent() == []
    assert link.to_server() == [StreamReset(c, ErrorCode.REFUSED_STREAM)]
    assert c not in link.agent.streams and c not in link.server.streams
    # Late frames for the refused stream are dropped; a closed slot makes room again.
    link.agent.reset_stream(a, ErrorCode.CONNECT_FAILED)
    link.to_server()
    assert link.open() == c + 1
    assert sorted(link.agent.streams) == [b, c + 1]


def test_refused_stream_late_frames_dropped_on_agent():
    agent, peer = raw_agent(max_streams=1)
    agent.receive_data(peer.record(OPEN(1), OPEN(2)))
    assert peer.read(agent) == [RESET(2, ErrorCode.REFUSED_STREAM)]
    assert agent.receive_data(peer.record(DATA(2, b"x"), FIN(2))) == []


# ----- tampering (A5) -----------------------------------------------------------------------
N_RECORDS = 20


def deliver(agent, records):
    """Feed records one by one; -> (events per record, index of the record that raised)."""
    per_record = []
    for index, record in enumerate(records):
        try:
            per_record.append(agent.receive_data(record))
        except ProtocolError:
            return per_record, index
    return per_record, None


def server_records(n=N_RECORDS):
    """n sealed records from a configured server: OK, OPEN, then DATA records."""
    server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S), window=WINDOW)
    server.receive_data(RawPeer(SERVER).record(Frame(FrameType.CONFIG, 0, b"{}")))
    server.accept({"window": WINDOW})
    records = [drain(server)]
    sid = server.open_stream()
    records.append(drain(server))
    for i in range(n - 2):
        server.send_data(sid, b"record %02d" % i)
        records.append(drain(server))
    spy = cipher(KEY_S2A)
    assert all(split_records(spy, r) == [r] for r in records)  # one record each
    return records


def new_agent():
    return Session(AGENT, cipher(KEY_A2S), cipher(KEY_S2A))


def test_untampered_records_all_arrive():
    per_record, bad = deliver(new_agent(), server_records())
    assert bad is None
    assert per_record[0] == [Accepted({"window": WINDOW})]
    assert per_record[1] == [StreamOpened(1, {})]
    assert [e for r in per_record[2:] for e in r] == [
        DataReceived(1, b"record %02d" % i) for i in range(N_RECORDS - 2)]


def _expect_failure_at(records, k):
    per_record, bad = deliver(new_agent(), records)
    assert bad == k
    assert len(per_record) == k  # events of the good records before k, none from k on
    assert all(len(events) == 1 for events in per_record)


REGIONS = {
    "length ciphertext": lambda size: 0,
    "length ciphertext 2": lambda size: 1,
    "length tag": lambda size: 2 + 7,
    "length tag end": lambda size: 17,
    "body ciphertext": lambda size: 18,
    "body tag": lambda size: size - 1,
}


@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("k", [0, 1, 7, N_RECORDS - 1])
@pytest.mark.parametrize("bit", [0, 7])
def test_bit_flip_fails_at_that_record(region, k, bit):
    records = server_records()
    victim = bytearray(records[k])
    victim[REGIONS[region](len(victim))] ^= 1 << bit
    records[k] = bytes(victim)
    _expect_failure_at(records, k)


@pytest.mark.parametrize("k", [0, 1, 9])
def test_duplicate_record(k):
    records = server_records()
    _expect_failure_at(records[:k + 1] + [records[k]] + records[k + 1:], k + 1)


@pytest.mark.parametrize("k", [0, 1, 9])
def test_swapped_records(k):
    records = server_records()
    records[k], records[k + 1] = records[k + 1], records[k]
    _expect_failure_at(records, k)


@pytest.mark.parametrize("k", [0, 1, 9])
def test_dropped_record(k):
    records = server_records()
    del records[k]
    _expect_failure_at(records, k)


@pytest.mark.parametrize("cut", [1, 17, 18, 19, -1])
def test_truncated_record_then_more_bytes(cut):
    records = server_records()
    k = 5
    truncated = records[k][:cut] if cut > 0 else records[k][:cut]
    agent = new_agent()
    for record in records[:k]:
        agent.receive_data(record)
    assert agent.receive_data(truncated) == []  # not enough bytes yet: a normal return
    with pytest.raises(ProtocolError):
        agent.receive_data(b"".join(records[k + 1:]))


def test_truncated_record_alone_waits():
    records = server_records()
    agent = new_agent()
    assert agent.receive_data(records[0][:-1]) == []
    assert agent.receive_data(records[0][-1:]) == [Accepted({"window": WINDOW})]


def test_bad_record_in_a_batch_returns_no_later_events():
    records = server_records()
    records[10] = records[10][:-1] + bytes([records[10][-1] ^ 1])
    agent = new_agent()
    for record in records[:5]:
        agent.receive_data(record)
    # Records 5..9 are good, 10 is bad: the call raises, so it returns no event at all.
    with pytest.raises(ProtocolError, match="bad record tag"):
        agent.receive_data(b"".join(records[5:]))


def test_zero_length_record_is_rejected():
    aead = crypto.get_backend()
    header = aead.seal(KEY_S2A, 0, b"", b"\x00\x00")
    with pytest.raises(ProtocolError, match="zero-length"):
        new_agent().receive_data(header)


def test_record_from_the_wrong_direction_is_rejected():
    # A record sealed with the agent->server key and reflected back to the agent.
    link = Link(configure=False)
    link.agent.send_config({"subdomain": "x"})
    with pytest.raises(ProtocolError):
        link.agent.receive_data(drain(link.agent))


def test_record_with_a_bad_frame_is_an_error():
    agent, peer = raw_agent()
    with pytest.raises(ProtocolError, match="reserved flags"):
        agent.receive_data(peer.record(b"\x05\x01\x00\x00\x00\x01\x00\x01x"))


def test_a_bad_frame_after_a_good_one_in_the_same_record_yields_no_events():
    agent, peer = raw_agent()
    agent.receive_data(peer.record(OPEN(1)))
    with pytest.raises(ProtocolError):
        agent.receive_data(peer.record(DATA(1, b"good"), Frame(0x7F, 0, b"")))


# ----- one byte at a time -----------------------------------------------------------------
def _scripted_conversation(link):
    """A conversation touching every event type; returns events on both sides, in order."""
    events = []
    sid = link.open({"remote": "10.0.0.1:4444"})
    other = link.open()
    link.server.send_data(sid, b"GET / HTTP/1.1\r\n\r\n" * 3000)
    link.server.send_data(other, b"x")
    link.server.ping(b"12345678")
    events += link.to_agent()
    link.agent.acknowledge(sid, 54000)
    link.agent.send_data(sid, b"HTTP/1.1 200 OK\r\n" * 10)
    link.agent.send_fin(sid)
    link.agent.reset_stream(other, ErrorCode.CONNECT_FAILED)
    events += link.to_server()
    link.server.send_fin(sid)
    link.server.goaway(ErrorCode.NO_ERROR, "done")
    events += link.to_agent()
    return events


def test_one_byte_at_a_time_gives_the_same_events():
    whole = _scripted_conversation(Link(window=100_000))
    bytewise = _scripted_conversation(Link(window=100_000, one_byte=True))
    assert whole == bytewise
    assert {type(e) for e in whole} == {
        DataReceived, PongReceived, WindowUpdated, StreamEnded, StreamReset, GoAwayReceived}


@pytest.mark.parametrize("chunk", [2, 17, 18, 19, 35, 1000])
def test_arbitrary_chunking_gives_the_same_events(chunk):
    records = b"".join(server_records())
    expected = new_agent().receive_data(records)
    agent = new_agent()
    got = []
    for i in range(0, len(records), chunk):
        got += agent.receive_data(records[i:i + chunk])
    assert got == expected and len(got) == N_RECORDS


# ----- layering -----------------------------------------------------------------------------
def test_protocol_imports_no_io():
    import ast
    tree = ast.parse(open(protocol.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"collections", "dataclasses", "diglett", "diglett.crypto", "diglett.wire"}


# ----- stateful: a server/agent pair under random legal use (A6b) ---------------------------
class PairMachine(RuleBasedStateMachine):
    """Legal commands in any order; legal inputs must never raise, and the books must balance."""

    streams = Bundle("streams")

    @initialize(window=st.sampled_from([1, 2, 7, 300, 4096, 70_000]),
                max_streams=st.sampled_from([1, 3, 1000]))
    def setup(self, window, max_streams):
        self.window = window
        self.server = Session(SERVER, cipher(KEY_S2A), cipher(KEY_A2S), window=window)
        self.agent = Session(AGENT, cipher(KEY_A2S), cipher(KEY_S2A), max_streams=max_streams)
        self.sessions = {SERVER: self.server, AGENT: self.agent}
        self.wires = {SERVER: b"", AGENT: b""}  # bytes sent by a side, not yet delivered
        self.sent = {SERVER: {}, AGENT: {}}  # stream id -> bytes sent by that side
        self.received = {SERVER: {}, AGENT: {}}  # stream id -> bytes received by that side
        self.acked = {SERVER: {}, AGENT: {}}
        self.ended = {SERVER: set(), AGENT: set()}  # got the peer's FIN
        self.reset = set()  # ids reset by either side: data may be cut short
        self.fins = {SERVER: set(), AGENT: set()}  # ids a side sent FIN on while open
        self.closed = {SERVER: set(), AGENT: set()}  # ids that left session.streams
        self.opened_on_agent = set()
        self.agent.send_config({"subdomain": "m"})
        self._flush()
        self.server.accept({"window": window})
        self._flush()
        assert self.agent.window == window

    # --- plumbing
    def _peer(self, role):
        return AGENT if role == SERVER else SERVER

    def _pump(self, role):
        self.wires[role] += drain(self.sessions[role])

    def _deliver(self, role, nbytes):
        self._pump(role)
        data, self.wires[role] = self.wires[role][:nbytes], self.wires[role][nbytes:]
        dst = self._peer(role)
        for event in self.sessions[dst].receive_data(data):
            self._on_event(dst, event)

    def _flush(self):
        while self.server.has_output or self.agent.has_output or any(self.wires.values()):
            self._deliver(SERVER, len(self.wires[SERVER]) + 10**9)
            self._deliver(AGENT, len(self.wires[AGENT]) + 10**9)

    def _on_event(self, role, event):
        if isinstance(event, StreamOpened):
            assert role == AGENT
            assert event.stream_id not in self.opened_on_agent
            self.opened_on_agent.add(event.stream_id)
        elif isinstance(event, DataReceived):
            sid = event.stream_id
            assert event.data
            assert sid not in self.ended[role], "DATA after FIN"
            got = self.received[role].setdefault(sid, b"") + event.data
            self.received[role][sid] = got
            assert self.sent[self._peer(role)].get(sid, b"").startswith(got), "bytes out of order"
        elif isinstance(event, StreamEnded):
            self.ended[role].add(event.stream_id)
        elif isinstance(event, StreamReset):
            self.reset.add(event.stream_id)

    # --- rules (sending and delivering have several rules each so they dominate a run)
    @rule(target=streams)
    def open_stream(self):
        return self.server.open_stream({"remote": "127.0.0.1:1"})

    def _send(self, side, sid, size, byte):
        session = self.sessions[side]
        size = min(size, session.send_credit(sid))
        if size == 0:
            return
        data = bytes([byte]) * size
        assert session.send_data(sid, data)
        self.sent[side][sid] = self.sent[side].get(sid, b"") + data

    @rule(sid=streams, size=st.integers(1, 200_000), byte=st.integers(0, 255))
    def send_from_server(self, sid, size, byte):
        self._send(SERVER, sid, size, byte)

    @rule(sid=streams, size=st.integers(1, 200_000), byte=st.integers(0, 255))
    def send_from_agent(self, sid, size, byte):
        self._send(AGENT, sid, size, byte)

    @rule(sid=streams, side=st.sampled_from([SERVER, AGENT]),
          fraction=st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    def acknowledge(self, sid, side, fraction):
        unacked = len(self.received[side].get(sid, b"")) - self.acked[side].get(sid, 0)
        nbytes = int(unacked * fraction)
        self.sessions[side].acknowledge(sid, nbytes)
        self.acked[side][sid] = self.acked[side].get(sid, 0) + nbytes

    @rule()
    def acknowledge_everything(self):
        for side, session in self.sessions.items():
            for sid, data in self.received[side].items():
                session.acknowledge(sid, len(data) - self.acked[side].get(sid, 0))
                self.acked[side][sid] = len(data)

    @rule(sid=streams, side=st.sampled_from([SERVER, AGENT]))
    def fin(self, sid, side):
        if self.sessions[side].send_credit(sid) or sid in self.sessions[side].streams:
            self.fins[side].add(sid)
        self.sessions[side].send_fin(sid)

    @rule(sid=streams, side=st.sampled_from([SERVER, AGENT]),
          code=st.sampled_from([ErrorCode.CONNECT_FAILED, ErrorCode.INTERNAL_ERROR, 999]),
          really=st.integers(0, 2))
    def reset_stream(self, sid, side, code, really):
        if really:  # resets end streams early; keep them rarer than the other rules
            return
        if sid in self.sessions[side].streams:
            self.reset.add(sid)
        self.sessions[side].reset_stream(sid, code)

    @rule(nbytes=st.one_of(st.just(1), st.integers(1, 300_000)))
    def deliver_to_agent(self, nbytes):
        self._deliver(SERVER, nbytes)

    @rule(nbytes=st.one_of(st.just(1), st.integers(1, 300_000)))
    def deliver_to_server(self, nbytes):
        self._deliver(AGENT, nbytes)

    @rule(side=st.sampled_from([SERVER, AGENT]), payload=st.binary(min_size=8, max_size=8))
    def ping(self, side, payload):
        self.sessions[side].ping(payload)

    @rule()
    def flush(self):
        """Deliver everything both ways: every byte sent on a stream nobody reset has arrived."""
        self._flush()
        for side in (SERVER, AGENT):
            peer = self._peer(side)
            for sid, data in self.sent[side].items():
                if sid not in self.reset:
                    assert self.received[peer].get(sid, b"") == data
        for sid in self.fins[SERVER] & self.fins[AGENT] - self.reset:
            assert sid in self.ended[SERVER] and sid in self.ended[AGENT]
            assert sid not in self.server.streams and sid not in self.agent.streams

    # --- invariants
    @invariant()
    def credit_never_negative(self):
        if not hasattr(self, "sessions"):
            return
        for session in self.sessions.values():
            for stream in session.streams.values():
                assert 0 <= stream.send_credit <= wire.MAX_WINDOW
                assert 0 <= stream.recv_allowed <= self.window

    @invariant()
    def buffered_within_window(self):
        if not hasattr(self, "sessions"):
            return
        for side in (SERVER, AGENT):
            for sid, data in self.received[side].items():
                assert len(data) - self.acked[side].get(sid, 0) <= self.window

    @invariant()
    def closed_ids_never_resurrect(self):
        if not hasattr(self, "sessions"):
            return
        for side, session in self.sessions.items():
            live = set(session.streams)
            assert not (live & self.closed[side])
            known = set(range(1, session.last_stream_id + 1))
            self.closed[side] |= known - live
            assert live <= known


TestPairMachine = PairMachine.TestCase
TestPairMachine.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
