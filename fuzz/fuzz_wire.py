"""atheris target: the cleartext and frame decoders of diglett.wire.

Each input is one record's plaintext for decode_frames, and its first 8 bytes are also a
preamble and a reject. Allowed outcome: frames, or wire.ProtocolError. Anything else crashes.
"""

from common import instrumented, run

with instrumented():
    from diglett import wire


def target(data):
    try:
        frames = wire.decode_frames(data)
    except wire.ProtocolError:
        pass
    else:  # what is accepted re-encodes to the same bytes: nothing skipped or guessed
        again = b"".join(wire.encode_frame(f.type, f.stream_id, bytes(f.payload)) for f in frames)
        if again != data:
            raise AssertionError("decode_frames accepted bytes it does not re-encode")
        for frame in frames:  # the payload decoders the Session calls on accepted frames
            if frame.type in (wire.FrameType.CONFIG, wire.FrameType.OK, wire.FrameType.OPEN):
                try:
                    wire.decode_json(frame.payload, "payload")
                except wire.ProtocolError:
                    pass
            elif frame.type in (wire.FrameType.ERROR, wire.FrameType.GOAWAY):
                wire.decode_code_reason(frame.payload)
    for parse in (wire.parse_preamble, wire.parse_reject):
        try:
            parse(data[:wire.PREAMBLE_SIZE])
        except wire.ProtocolError:
            pass


if __name__ == "__main__":
    run(target)
