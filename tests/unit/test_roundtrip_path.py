"""The kept round trip's fast paths (issue 14): what they may assume, and that they hold.

The tunnel reads every agent connection into one shared buffer, so Session.receive_data must
keep no view of its input; the record cipher calls the AEAD's per-key functions directly, so
both backends must still produce the same records and refuse the same forgeries; sealing and
decoding have a path for a lone DATA frame, which must agree with the general one; and a read
must never allocate enough for malloc to map fresh pages (the page faults per round trip are
counted on the real processes in tests/e2e/test_data.py).
"""

import socket

import gevent.socket
import pytest

from diglett import crypto, pump, tunnel, wire
from diglett.protocol import AGENT, SERVER, DataReceived, Session, StreamEnded, StreamOpened
from diglett.reach.tls_socket import TlsSocket
from diglett.sockets import kernel_socket
from diglett.wire import FrameType, ProtocolError

MMAP_THRESHOLD = 128 * 1024  # glibc's default: larger allocations are mapped pages
BYTES_OVERHEAD = 33  # a bytes object's header and trailing NUL on 64-bit CPython


class Link:
    """A configured server and agent session with one stream, joined in memory; ``spy``
    decrypts what the server sends so a test can see its frames."""

    def __init__(self, window=1 << 20):
        keys, chaining = (b"\x11" * 32, b"\x33" * 32), b"\x22" * 32

        def cipher(key):
            return crypto.TransportCipher(key, chaining, crypto.get_backend())

        self.server = Session(SERVER, cipher(keys[0]), cipher(keys[1]), window=window)
        self.agent = Session(AGENT, cipher(keys[1]), cipher(keys[0]))
        self.spy = cipher(keys[0])  # decrypts a copy of what the server sends
        for session in (self.server, self.agent):
            session.configured, session.window = True, window
        self.frames = []
        self.stream_id = self.server.open_stream()
        assert self.to_agent() == [StreamOpened(self.stream_id, {})]

    def to_agent(self):
        data = b"".join(self.server.buffers_to_send())
        cipher, offset = self.spy, 0
        while offset < len(data):  # the spy's own cipher: decrypt the frames as sent
            end = offset + crypto.RECORD_HEADER_SIZE
            length = cipher.open_length(data[offset:end])
            offset = end + length + crypto.TAG_SIZE
            self.frames += wire.decode_frames(cipher.open_body(data[end:offset]))
        return self.agent.receive_data(data)


def test_receive_data_keeps_no_view_of_its_input():
    """Whole records and records cut across reads both survive the buffer being overwritten."""
    link = Link()
    stream_id = link.stream_id
    messages = [b"first message", b"x" * 70000, b"third"]
    for message in messages:
        link.server.send_data(stream_id, message)
    wire_bytes = b"".join(link.server.buffers_to_send())
    buffer = bytearray(len(wire_bytes))
    received = []
    for start, end in ((0, 30), (30, 70100), (70100, len(wire_bytes))):
        view = memoryview(buffer)[:end - start]
        view[:] = wire_bytes[start:end]
        events = link.agent.receive_data(view)
        view[:] = b"\xee" * len(view)  # the tunnel's next read lands here
        received += events
    assert b"".join(bytes(e.data) for e in received if type(e) is DataReceived) \
        == b"".join(messages)


def test_tunnel_reads_plain_sockets_into_the_shared_buffer_and_tls_with_recv():
    """TlsSocket forwards unknown attributes to its TCP socket: a recv_into found that way would
    read ciphertext, so the tunnel looks on the type."""
    assert not hasattr(TlsSocket, "recv_into")
    assert len(tunnel._READ_BUFFER) == tunnel.RECV_SIZE


def test_kernel_socket_only_unwraps_a_plain_gevent_socket():
    """A subclass (gevent's SSLSocket) or a wrapper must keep its own calls: under it is the
    TCP socket, and a send there would skip the TLS layer."""
    class Subclass(gevent.socket.socket):
        pass

    plain, sub, stdlib = gevent.socket.socket(), Subclass(), socket.socket()
    try:
        assert kernel_socket(plain) is plain._sock
        assert kernel_socket(plain).gettimeout() == 0.0  # never waits
        assert kernel_socket(sub) is sub
        assert kernel_socket(stdlib) is stdlib
    finally:
        for sock in (plain, sub, stdlib):
            sock.close()


def test_reads_stay_below_the_mmap_threshold():
    assert pump.STREAM_RECV_MAX + BYTES_OVERHEAD < MMAP_THRESHOLD
    assert pump.STREAM_RECV_MAX <= wire.MAX_DATA_PAYLOAD  # one DATA frame per read


@pytest.mark.parametrize("backend", crypto.available_backends())
def test_record_cipher_matches_the_backend_interface(backend):
    """seal_parts through keyed() gives the bytes of the generic seal(), across a rotation."""
    aead = crypto.get_backend(backend)
    key, ck = b"\x07" * 32, b"\x09" * 32
    sender = crypto.TransportCipher(key, ck, aead)
    receiver = crypto.TransportCipher(key, ck, crypto.get_backend(backend))
    nonce = 0
    for index in range(crypto.KEY_ROTATION_NONCE // 2 + 3):
        plaintext = b"record %d" % index
        header, body = sender.seal_parts(plaintext)
        if sender.rotations == 0:
            assert header == aead.seal(key, nonce, b"", len(plaintext).to_bytes(2, "big"))
            assert body == aead.seal(key, nonce + 1, b"", plaintext)
            nonce += 2
        assert receiver.open_length(header) == len(plaintext)
        assert receiver.open_body(body) == plaintext
    assert sender.rotations == receiver.rotations == 1


@pytest.mark.parametrize("backend", crypto.available_backends())
def test_forged_records_are_refused_by_both_backends(backend):
    key, ck = b"\x07" * 32, b"\x09" * 32
    sender = crypto.TransportCipher(key, ck, crypto.get_backend(backend))
    header, body = sender.seal_parts(b"payload")
    receiver = crypto.TransportCipher(key, ck, crypto.get_backend(backend))
    with pytest.raises(crypto.DecryptError, match="bad record length tag"):
        receiver.open_length(bytes([header[0] ^ 1]) + header[1:])
    assert receiver.open_length(header) == 7  # the failure changed nothing
    with pytest.raises(crypto.DecryptError, match="bad record tag"):
        receiver.open_body(body[:-1] + bytes([body[-1] ^ 1]))


@pytest.mark.parametrize("frame, error", [
    (wire._HEADER.pack(FrameType.DATA, 1, 3, 2) + b"ab", "reserved flags"),
    (wire._HEADER.pack(FrameType.DATA, 0, 0, 2) + b"ab", "DATA on stream 0"),
    (wire._HEADER.pack(FrameType.DATA, 0, 3, 3) + b"ab", "overruns the record"),
    (wire._HEADER.pack(FrameType.DATA, 0, 3, 0), "payload of 0 bytes"),
])
def test_lone_data_frame_fast_path_refuses_what_the_general_path_refuses(frame, error):
    with pytest.raises(ProtocolError, match=error):
        wire.decode_frames(frame)


def test_lone_data_frame_and_mixed_records_decode_alike():
    data = wire.encode_frame(FrameType.DATA, 5, b"hello")
    fin = wire.encode_frame(FrameType.FIN, 5)
    assert [tuple(f[:2]) + (bytes(f[2]),) for f in wire.decode_frames(data)] \
        == [(FrameType.DATA, 5, b"hello")]
    assert [f.type for f in wire.decode_frames(data + fin)] == [FrameType.DATA, FrameType.FIN]


def test_sealing_fast_path_keeps_fin_and_order():
    """One queued DATA takes the fast path; DATA then FIN, or a control frame, do not."""
    link = Link()
    stream_id = link.stream_id
    link.server.send_data(stream_id, b"one")
    assert link.to_agent() == [DataReceived(stream_id, b"one")]
    link.server.send_data(stream_id, b"two")
    link.server.send_fin(stream_id)
    assert link.to_agent() == [DataReceived(stream_id, b"two"), StreamEnded(stream_id)]
    link.server.send_data(stream_id, b"three")  # FIN queued: refused, nothing sealed
    link.server.ping(b"12345678")
    assert link.to_agent() == []
    assert [f.type for f in link.frames][-3:] == [
        FrameType.DATA, FrameType.FIN, FrameType.PING]
