"""Fuzzing the sans-IO decoders and the handshake under Hypothesis (issue 6).

Every decoder a peer can reach gets random and mutated bytes: the frame decoder, the preamble
and reject parsers, the three handshake acts on both sides, Session.receive_data with records
sealed under the right keys (so the bytes reach the frame parser), and the PROXY header
reader. Each must return events or raise its module's documented error (wire.ProtocolError,
noise.HandshakeError, proxyproto.HeaderError), never another exception, never hang, and never
buffer more than one record. A state machine runs the whole handshake between an Initiator
and a Responder over a link that corrupts, truncates, injects and splits bytes at random.

The budget is the "fuzz-ci" profile of tests/conftest.py (derandomized, a few hundred
examples, under a minute for the file); HYPOTHESIS_PROFILE=fuzz runs the same tests long.
tests/unit/test_wire.py, tests/unit/test_noise.py and tests/unit/test_proxyproto.py hold the narrower property tests
this file builds on; tests/e2e/test_bad_input.py throws the same kinds of bytes at a real server.

Why ~580 lines: one subject, the decoders under Hypothesis: the strategies and state machines
are shared, so they stay together.
"""

import os

import coincurve
import pytest
from hypothesis import event, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from diglett import crypto, noise, protocol, proxyproto, wire
from diglett.crypto import RECORD_HEADER_SIZE, TAG_SIZE, public_key_bytes
from diglett.noise import ACT_ONE_SIZE, ACT_THREE_SIZE, ACT_TWO_SIZE, HandshakeError
from diglett.protocol import AGENT, SERVER, Session
from diglett.wire import FrameType, ProtocolError

PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE") or "fuzz-ci"
PROFILE = settings.get_profile(PROFILE_NAME)
# The CI budget runs in seconds; a long run (HYPOTHESIS_PROFILE=fuzz) gets hours per test.
pytestmark = pytest.mark.timeout(120 if PROFILE_NAME == "fuzz-ci" else 4 * 3600)
FUZZ = settings(PROFILE)
# ECDH-heavy tests (a fresh handshake per example) get a third of the budget in CI.
FUZZ_SLOW = settings(PROFILE, max_examples=max(50, PROFILE.max_examples // 3))

MAX_RECORD = RECORD_HEADER_SIZE + wire.MAX_RECORD_PLAINTEXT + TAG_SIZE  # most a Session buffers
EVENT_TYPES = (
    protocol.ConfigReceived, protocol.Accepted, protocol.Refused, protocol.StreamOpened,
    protocol.DataReceived, protocol.StreamEnded, protocol.StreamReset, protocol.WindowUpdated,
    protocol.PongReceived, protocol.GoAwayReceived,
)
SERVER_KEY = coincurve.PrivateKey(b"\x11" * 32)  # fixed keys: ECDH on fresh ephemerals only
AGENT_KEY = coincurve.PrivateKey(b"\x22" * 32)
PREAMBLE = wire.encode_preamble()
PROLOGUE = wire.prologue(PREAMBLE)


# ----- strategies -------------------------------------------------------------------------------
def mutated(valid, max_edits=4):
    """``valid`` with a few bytes changed (XOR, never a no-op), cut short, or extended."""
    @st.composite
    def build(draw):
        data = bytearray(valid)
        for _ in range(draw(st.integers(0, max_edits))):
            if not data:
                break
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        kind = draw(st.sampled_from(["same", "cut", "extend"]))
        if kind == "cut":
            data = data[:draw(st.integers(0, len(data)))]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        return bytes(data)
    return build()


def bytes_or_mutation(valid, max_size=None):
    max_size = max_size or 2 * len(valid)
    return st.one_of(st.binary(max_size=max_size), mutated(valid))


JSON_OBJECTS = st.dictionaries(
    st.sampled_from(["subdomain", "window", "agent", "features", "remote", "local", "x"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=12),
              st.lists(st.integers(), max_size=3)),
    max_size=4,
).map(lambda obj: wire.encode_json(obj, wire.MAX_CONFIG_SIZE))


PAYLOADS = {
    FrameType.CONFIG: st.one_of(JSON_OBJECTS, st.binary(min_size=2, max_size=40)),
    FrameType.OK: st.one_of(JSON_OBJECTS, st.binary(min_size=2, max_size=40)),
    FrameType.ERROR: st.binary(min_size=2, max_size=40),
    FrameType.OPEN: st.one_of(st.just(b""), JSON_OBJECTS, st.binary(max_size=40)),
    FrameType.DATA: st.binary(min_size=1, max_size=64),
    FrameType.FIN: st.just(b""),
    FrameType.RESET: st.integers(0, 0xFFFF).map(wire.encode_u16),
    FrameType.WINDOW: st.one_of(st.integers(0, 4).map(wire.encode_u32),
                                st.integers(0, 2**32 - 1).map(wire.encode_u32)),
    FrameType.PING: st.binary(min_size=8, max_size=8),
    FrameType.PONG: st.binary(min_size=8, max_size=8),
    FrameType.GOAWAY: st.binary(min_size=2, max_size=40),
}
STREAM_TYPES = {FrameType.OPEN, FrameType.DATA, FrameType.FIN, FrameType.RESET, FrameType.WINDOW}


@st.composite
def valid_frame(draw):
    """A frame decode_frames accepts, so the Session's handlers get to judge it."""
    ftype = draw(st.sampled_from(list(FrameType)))
    stream_id = draw(st.integers(1, 6)) if ftype in STREAM_TYPES else 0
    return wire.encode_frame(ftype, stream_id, draw(PAYLOADS[ftype]))


@st.composite
def broken_frame(draw):
    """A frame with any header field possibly wrong."""
    ftype = draw(st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)))
    stream_id = draw(st.one_of(st.integers(0, 4), st.integers(0, wire.MAX_STREAM_ID)))
    payload = draw(PAYLOADS.get(ftype, st.binary(max_size=40)))
    flags = draw(st.one_of(st.just(0), st.integers(0, 255)))
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, 0xFFFF)))
    return bytes([ftype, flags]) + stream_id.to_bytes(4, "big") + length.to_bytes(2, "big") + payload


# One broken frame in eight: most records get past decode_frames to the Session's handlers.
frame_bytes = st.integers(0, 7).flatmap(lambda n: broken_frame() if n == 7 else valid_frame())


_frame_lists = st.lists(frame_bytes, min_size=1, max_size=4).map(b"".join)
record_plaintexts = st.integers(0, 7).flatmap(  # one record in eight is raw bytes
    lambda n: st.binary(min_size=1, max_size=200) if n == 7 else _frame_lists)


def pieces(data, cuts):
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# ----- helpers ----------------------------------------------------------------------------------
def handshake_pair():
    """A fresh Initiator/Responder pair and the genuine acts one and two between them."""
    initiator = noise.Initiator(AGENT_KEY, public_key_bytes(SERVER_KEY), PROLOGUE)
    responder = noise.Responder([SERVER_KEY], PROLOGUE)
    act_one = initiator.act_one()
    return initiator, responder, act_one


def completed_handshake():
    """(initiator, responder) after a real handshake: transport ciphers on both sides."""
    initiator, responder, act_one = handshake_pair()
    act_three = initiator.read_act_two(responder.read_act_one(act_one))
    responder.read_act_three(act_three)
    return initiator, responder


def check_events(events):
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, EVENT_TYPES), event


# ----- wire: frames, preamble, reject -------------------------------------------------------------
@FUZZ
@given(st.lists(frame_bytes, min_size=1, max_size=6).map(b"".join))
def test_frame_decoder_takes_frame_shaped_bytes(plaintext):
    """Frame-shaped input passes the header checks far more often than random bytes do."""
    try:
        frames = wire.decode_frames(plaintext)
    except ProtocolError as exc:
        assert isinstance(exc.code, int)
        return
    assert b"".join(wire.encode_frame(f.type, f.stream_id, bytes(f.payload)) for f in frames) \
        == plaintext


@FUZZ
@given(st.one_of(st.binary(max_size=20), mutated(PREAMBLE)))
def test_preamble_parser(data):
    try:
        preamble = wire.parse_preamble(data)
    except ProtocolError:
        return
    assert wire.encode_preamble(*preamble) == data


@FUZZ
@given(st.one_of(st.binary(max_size=20),
                 mutated(wire.encode_reject(wire.RejectCode.SERVER_KEY_MISMATCH))))
def test_reject_parser(data):
    try:
        server_max, code = wire.parse_reject(data)
    except ProtocolError:
        return
    assert 0 <= server_max <= 255 and 0 <= int(code) <= 0xFFFF


@FUZZ
@given(st.binary(max_size=wire.MAX_CONFIG_SIZE + 8))
def test_payload_decoders_behind_a_valid_frame(payload):
    """decode_json and decode_code_reason, on whatever payload sizes decode_frames lets by."""
    try:
        wire.decode_json(payload, "CONFIG")
    except ProtocolError:
        pass
    if 2 <= len(payload) <= 2 + wire.MAX_REASON_SIZE:  # ERROR and GOAWAY's allowed sizes
        code, reason = wire.decode_code_reason(payload)
        assert 0 <= code <= 0xFFFF and isinstance(reason, str)


# ----- the handshake, one act at a time -------------------------------------------------------------
@FUZZ_SLOW
@given(st.data())
def test_responder_act_one(data):
    _, responder, act_one = handshake_pair()
    received = data.draw(bytes_or_mutation(act_one), label="act one")
    try:
        act_two = responder.read_act_one(received)
    except HandshakeError as exc:
        assert received != act_one, exc.reason
        return
    assert received == act_one and len(act_two) == ACT_TWO_SIZE


@FUZZ_SLOW
@given(st.data())
def test_initiator_act_two(data):
    initiator, responder, act_one = handshake_pair()
    act_two = responder.read_act_one(act_one)
    received = data.draw(bytes_or_mutation(act_two), label="act two")
    try:
        act_three = initiator.read_act_two(received)
    except HandshakeError as exc:
        assert received != act_two, exc.reason
        return
    assert received == act_two and len(act_three) == ACT_THREE_SIZE


@FUZZ_SLOW
@given(st.data())
def test_responder_act_three(data):
    initiator, responder, act_one = handshake_pair()
    act_three = initiator.read_act_two(responder.read_act_one(act_one))
    received = data.draw(bytes_or_mutation(act_three), label="act three")
    try:
        remote_static = responder.read_act_three(received)
    except HandshakeError as exc:
        assert received != act_three, exc.reason
        return
    assert received == act_three and remote_static == public_key_bytes(AGENT_KEY)


# ----- the record layer after a real handshake --------------------------------------------------
def prime(session, peer_send, role, configured, streams):
    """Put ``session`` where the fuzzed records find it: configured or not, streams open."""
    if not configured:
        return b""
    if role == SERVER:
        first = wire.encode_frame(FrameType.CONFIG, 0, b'{"subdomain":"foo"}')
        session.receive_data(peer_send.seal(first))
        session.accept({"window": 4096})
        for _ in range(streams):
            session.open_stream({"remote": "192.0.2.1:1"})
        return session.data_to_send()
    frames = [wire.encode_frame(FrameType.OK, 0, b'{"window":4096}')]
    frames += [wire.encode_frame(FrameType.OPEN, n + 1) for n in range(streams)]
    session.receive_data(peer_send.seal(b"".join(frames)))
    return session.data_to_send()


@FUZZ_SLOW
@given(role=st.sampled_from([SERVER, AGENT]), configured=st.sampled_from([True, True, False]),
       streams=st.integers(0, 6), plaintexts=st.lists(record_plaintexts, min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 2**16), max_size=8), drain=st.booleans())
def test_session_sealed_random_records(role, configured, streams, plaintexts, cuts, drain):
    """Records that pass the AEAD carry random frames: events or ProtocolError, bounded buffers."""
    initiator, responder = completed_handshake()
    if role == SERVER:
        session = Session(SERVER, responder.send_cipher, responder.recv_cipher, window=4096)
        peer_send = initiator.send_cipher
    else:
        session = Session(AGENT, initiator.send_cipher, initiator.recv_cipher)
        peer_send = responder.send_cipher
    prime(session, peer_send, role, configured, streams)
    stream = b"".join(peer_send.seal(p) for p in plaintexts)
    try:
        for piece in pieces(stream, cuts):
            check_events(session.receive_data(piece))
            assert len(session._inbuf) < MAX_RECORD  # at most one cut header or body is held
            if drain:
                session.data_to_send()  # answers (PONG, RESET) seal without error
    except ProtocolError as exc:
        assert isinstance(exc.code, int) and 0 <= exc.code <= 0xFFFF
        event("ProtocolError %s: %s" % (wire.code_name(exc.code), " ".join(str(exc).split()[:2])))
        return
    event("accepted")
    assert session.records_in == len(plaintexts) + (1 if configured else 0)
    session.data_to_send()


@FUZZ
@given(role=st.sampled_from([SERVER, AGENT]), data=st.binary(max_size=400),
       cuts=st.lists(st.integers(0, 400), max_size=8))
def test_session_unsealed_random_bytes(role, data, cuts):
    """Bytes not sealed under the key fail the first header tag: at most 17 bytes wait."""
    send, recv = crypto.TransportCipher(b"\x01" * 32, b"\x02" * 32, crypto.get_backend()), \
        crypto.TransportCipher(b"\x03" * 32, b"\x02" * 32, crypto.get_backend())
    session = Session(role, send, recv)
    fed = 0
    try:
        for piece in pieces(data, cuts):
            fed += len(piece)
            assert session.receive_data(piece) == []
            assert len(session._inbuf) < RECORD_HEADER_SIZE
    except ProtocolError as exc:
        assert "bad record length tag" in str(exc) and fed >= RECORD_HEADER_SIZE
        return
    assert len(data) < RECORD_HEADER_SIZE


@FUZZ_SLOW
@given(st.data())
def test_session_mutated_valid_stream(data):
    """A valid server conversation with bytes flipped, cut or inserted fails with ProtocolError
    at the first changed byte's record, never earlier, never with another exception."""
    initiator, responder = completed_handshake()
    agent = Session(AGENT, initiator.send_cipher, initiator.recv_cipher)
    server = Session(SERVER, responder.send_cipher, responder.recv_cipher, window=4096)
    server.accept({"window": 4096})
    sid = server.open_stream({"remote": "192.0.2.1:1"})
    server.send_data(sid, b"x" * 3000)
    server.ping(b"12345678")
    server.send_fin(sid)
    genuine = b""
    while server.has_output:
        genuine += server.data_to_send(limit=1)  # one record per call: several records
    received = data.draw(mutated(genuine, max_edits=3), label="stream")
    cuts = data.draw(st.lists(st.integers(0, len(received)), max_size=6), label="cuts")
    try:
        for piece in pieces(received, cuts):
            check_events(agent.receive_data(piece))
            assert len(agent._inbuf) < MAX_RECORD
    except ProtocolError:
        assert received != genuine
        return
    # Accepted: everything it decrypted must be a prefix of the genuine bytes.
    assert genuine.startswith(received[:len(received) - len(agent._inbuf)])


# ----- PROXY protocol headers ------------------------------------------------------------------------
class ChunkedSocket:
    """A socket stand-in for agent_session.read_proxy_header: hands out ``data`` in chunks."""

    def __init__(self, data, sizes):
        self.data, self.sizes, self.taken = data, list(sizes), 0

    def recv(self, n):
        assert n >= 1
        size = min(n, self.sizes.pop(0) if self.sizes else n)
        chunk = self.data[self.taken:self.taken + size]
        self.taken += len(chunk)
        return chunk


V2_HEADER = proxyproto.encode_v2(("192.0.2.7", 50000), ("198.51.100.1", 80))
V1_HEADER = b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 80\r\n"


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(V2_HEADER, 6), mutated(V1_HEADER, 6),
                 st.binary(max_size=8).map(lambda tail: proxyproto.SIGNATURE_V2 + b"\x21\x11"
                                           + tail)),
       st.binary(max_size=64), st.lists(st.integers(1, 64), max_size=20))
def test_proxy_header_reader(header, tail, sizes):
    """The server's reader ends with a Header, HeaderError or ConnectionError (EOF), reads at
    most MAX_HEADER_SIZE bytes, and never takes a byte past the header it returns."""
    from diglett.gateway.agent_session import read_proxy_header  # gevent is only imported, not patched

    sock = ChunkedSocket(header + tail, sizes)
    try:
        parsed = read_proxy_header(sock)
    except (proxyproto.HeaderError, ConnectionError):
        assert sock.taken <= proxyproto.MAX_HEADER_SIZE
        return
    assert sock.taken == parsed.size <= proxyproto.MAX_HEADER_SIZE


@FUZZ
@given(st.binary(max_size=100), st.integers(0, 255))
def test_proxy_parser_decides_within_its_limit(start, fill):
    """However the bytes start, MAX_HEADER_SIZE of them are enough to decide: no unbounded
    wait for more (a None here would let a trusted proxy make the server buffer forever)."""
    for prefix in (b"", proxyproto.SIGNATURE_V2, b"PROXY "):
        head = prefix + start
        candidate = head + bytes([fill]) * (proxyproto.MAX_HEADER_SIZE - len(head))
        try:
            assert proxyproto.parse(candidate) is not None
        except proxyproto.HeaderError:
            pass


# ----- the handshake as a state machine over a faulty link --------------------------------------
class Direction:
    """One direction of the link: what the sender produced, and what is in flight."""

    def __init__(self):
        self.sent = bytearray()  # every byte the sender wrote, in order
        self.flight = bytearray()  # bytes on their way, after the link's faults
        self.inbox = bytearray()  # delivered to the receiver, not yet consumed
        self.consumed = bytearray()  # what the receiver has used so far

    def write(self, data):
        self.sent += data
        self.flight += data

    def genuine(self):
        """Has the receiver consumed only what the sender sent, in order?"""
        return self.sent.startswith(self.consumed)

    def take(self, size):
        if len(self.inbox) < size:
            return None
        data = bytes(self.inbox[:size])
        del self.inbox[:size]
        self.consumed += data
        return data


class HandshakeMachine(RuleBasedStateMachine):
    """An agent and a server driven like agent.py and server.py drive them (fixed-size reads,
    a reject told from act two by its first byte), with faults on the link in both ways.

    Each side consumes what arrives; a side that finishes must have consumed exactly what
    its peer sent, and both must then agree on keys; a side that fails must fail with
    HandshakeError or ProtocolError.
    """

    def __init__(self):
        super().__init__()
        self.up, self.down = Direction(), Direction()  # agent -> server, server -> agent
        self.initiator = noise.Initiator(AGENT_KEY, public_key_bytes(SERVER_KEY), PROLOGUE)
        self.responder = None
        self.agent_step = "act2"  # act2 -> done, or rejected / failed
        self.server_step = "preamble"  # preamble -> act1 -> act3 -> config -> done, or failed
        self.agent_session = self.server_session = None
        self.checked = False
        self.up.write(PREAMBLE + self.initiator.act_one())

    # --- faults on the link
    @rule(up=st.booleans(), index=st.integers(0, 200), xor=st.integers(1, 255))
    def corrupt(self, up, index, xor):
        flight = (self.up if up else self.down).flight
        if flight:
            flight[index % len(flight)] ^= xor

    @rule(up=st.booleans(), count=st.integers(1, 70))
    def truncate(self, up, count):
        flight = (self.up if up else self.down).flight
        del flight[max(0, len(flight) - count):]

    @rule(up=st.booleans(), index=st.integers(0, 200), junk=st.binary(min_size=1, max_size=9))
    def inject(self, up, index, junk):
        flight = (self.up if up else self.down).flight
        at = index % (len(flight) + 1)
        flight[at:at] = junk

    # --- delivery, split at arbitrary byte boundaries; deliveries outnumber faults
    def _deliver(self, direction, size):
        direction.inbox += direction.flight[:size]
        del direction.flight[:size]

    @rule(size=st.integers(1, 130))
    def deliver_up(self, size):
        self._deliver(self.up, size)
        self._run_server()

    @rule(size=st.integers(1, 130))
    def deliver_down(self, size):
        self._deliver(self.down, size)
        self._run_agent()

    @rule()
    def deliver_everything(self):
        for direction in (self.up, self.down, self.up, self.down):
            self._deliver(direction, len(direction.flight))
            self._run_server()
            self._run_agent()

    # --- the two sides
    def _fail(self, side, exc):
        assert isinstance(exc, (HandshakeError, ProtocolError)), repr(exc)
        setattr(self, side + "_step", "failed")

    def _run_server(self):
        try:
            self._server_steps()
        except (HandshakeError, ProtocolError) as exc:
            assert not self.up.genuine(), exc  # only changed bytes make the server fail
            self._fail("server", exc)

    def _server_steps(self):
        up = self.up
        if self.server_step == "preamble" and (data := up.take(wire.PREAMBLE_SIZE)):
            preamble = wire.parse_preamble(data)
            if preamble.version != wire.WIRE_VERSION:
                self.down.write(wire.encode_reject(wire.RejectCode.UNSUPPORTED_VERSION))
                raise ProtocolError("unsupported wire version %d" % preamble.version)
            self.responder = noise.Responder([SERVER_KEY], wire.prologue(data))
            self.server_step = "act1"
        if self.server_step == "act1" and (data := up.take(ACT_ONE_SIZE)):
            try:
                self.down.write(self.responder.read_act_one(data))
            except HandshakeError as exc:
                if exc.reason == "act1 bad tag":
                    self.down.write(wire.encode_reject(wire.RejectCode.SERVER_KEY_MISMATCH))
                raise
            self.server_step = "act3"
        if self.server_step == "act3" and (data := up.take(ACT_THREE_SIZE)):
            assert self.responder.read_act_three(data) == public_key_bytes(AGENT_KEY)
            assert up.genuine() and self.down.genuine()  # a tampered handshake never completes
            self.server_session = Session(SERVER, self.responder.send_cipher,
                                          self.responder.recv_cipher)
            self.server_step = "config"
        if self.server_step == "config" and up.inbox:
            events = self.server_session.receive_data(up.take(len(up.inbox)))
            check_events(events)
            if events:
                if [type(e) for e in events] != [protocol.ConfigReceived]:
                    raise ProtocolError("expected CONFIG alone")
                assert up.genuine()
                self.server_step = "done"

    def _run_agent(self):
        try:
            self._agent_steps()
        except (HandshakeError, ProtocolError) as exc:
            assert not self.down.genuine(), exc
            self._fail("agent", exc)

    def _agent_steps(self):
        down = self.down
        if self.agent_step == "act2" and down.inbox:
            if down.inbox[:1] == wire.MAGIC[:1]:
                if (data := down.take(wire.PREAMBLE_SIZE)) is None:
                    return
                server_max, code = wire.parse_reject(data)
                assert self.server_step == "failed" or not down.genuine()
                self.agent_step = "rejected"
                return
            if (data := down.take(ACT_TWO_SIZE)) is None:
                return
            act_three = self.initiator.read_act_two(data)
            assert down.genuine()
            self.agent_session = Session(AGENT, self.initiator.send_cipher,
                                         self.initiator.recv_cipher)
            self.agent_session.send_config({"subdomain": "foo"})
            self.up.write(act_three + self.agent_session.data_to_send())
            self.agent_step = "done"

    @invariant()
    def both_done_means_same_keys(self):
        if self.server_step == "done" and self.agent_step == "done" and not self.checked:
            self.checked = True
            assert self.initiator.handshake_hash == self.responder.handshake_hash
            self.server_session.accept({"window": 4096})
            self.server_session.ping(b"pingpong")
            events = self.agent_session.receive_data(self.server_session.data_to_send())
            assert events == [protocol.Accepted({"window": 4096})]  # the PING is answered
            assert self.agent_session.has_output

    def teardown(self):
        event("server %s, agent %s" % (self.server_step, self.agent_step))

    @invariant()
    def buffers_stay_small(self):
        for session in (self.server_session, self.agent_session):
            if session is not None:
                assert len(session._inbuf) < MAX_RECORD


TestHandshakeMachine = HandshakeMachine.TestCase
TestHandshakeMachine.settings = settings(PROFILE, max_examples=max(50, PROFILE.max_examples // 3))
