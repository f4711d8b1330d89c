"""atheris target: diglett.protocol.Session's record layer and frame handlers.

The ciphers are the golden transcript's transport keys, so the fuzzer's plaintexts are sealed
under the right keys and reach decode_frames and the handlers (an AEAD tag is no obstacle).
Input layout:

    byte 0     bit 0: role (0 server, 1 agent); bit 1: start configured (CONFIG or OK seen,
               streams 1-3 open); bit 2: raw mode (the rest goes to receive_data unsealed)
    byte 1     chunk size for feeding receive_data (0 means all at once)
    the rest   records: u16be length n, then n bytes of plaintext (n = 0 is skipped), repeated

Allowed outcome: events, or wire.ProtocolError; the Session never holds more than one record.
"""

from common import golden_hex, instrumented, run

with instrumented():
    from diglett import crypto, protocol, wire

A2S = golden_hex("derived", "agent_to_server_key")
S2A = golden_hex("derived", "server_to_agent_key")
CK = golden_hex("derived", "ck")
MAX_RECORD = crypto.RECORD_HEADER_SIZE + wire.MAX_RECORD_PLAINTEXT + crypto.TAG_SIZE
AEAD = crypto.get_backend()  # one object: its key cache then holds the two fixed keys


def cipher(key):
    return crypto.TransportCipher(key, CK, AEAD)


def session_and_peer(role, configured):
    if role == protocol.SERVER:
        session = protocol.Session(protocol.SERVER, cipher(S2A), cipher(A2S), window=4096)
        peer = cipher(A2S)
        if configured:
            session.receive_data(peer.seal(wire.encode_frame(wire.FrameType.CONFIG, 0, b"{}")))
            session.accept({"window": 4096})
            for _ in range(3):
                session.open_stream()
    else:
        session = protocol.Session(protocol.AGENT, cipher(A2S), cipher(S2A))
        peer = cipher(S2A)
        if configured:
            frames = wire.encode_frame(wire.FrameType.OK, 0, b'{"window":4096}') + b"".join(
                wire.encode_frame(wire.FrameType.OPEN, n) for n in (1, 2, 3))
            session.receive_data(peer.seal(frames))
    session.data_to_send()
    return session, peer


def records(body, peer):
    out, offset = [], 0
    while offset + 2 <= len(body):
        size = int.from_bytes(body[offset:offset + 2], "big")
        offset += 2
        plaintext = body[offset:offset + size]
        offset += size
        if plaintext:
            out.append(peer.seal(plaintext))
    return b"".join(out)


def target(data):
    if len(data) < 2:
        return
    role = protocol.AGENT if data[0] & 1 else protocol.SERVER
    session, peer = session_and_peer(role, bool(data[0] & 2))
    stream = data[2:] if data[0] & 4 else records(data[2:], peer)
    step = data[1] or len(stream) or 1
    try:
        for offset in range(0, len(stream), step):
            for event in session.receive_data(stream[offset:offset + step]):
                if not type(event).__module__ == protocol.__name__:
                    raise AssertionError("unknown event %r" % (event,))
            if len(session._inbuf) >= MAX_RECORD:
                raise AssertionError("Session buffers %d bytes" % len(session._inbuf))
            session.data_to_send()
    except wire.ProtocolError:
        pass


if __name__ == "__main__":
    run(target)
