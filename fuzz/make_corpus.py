"""Write the seed corpora in fuzz/corpus/<target>/: a few valid inputs per target, from the
golden transcript (tests/vectors/golden.json) and diglett's own encoders. Run it again after a
wire change; the files are small and committed.
"""

import shutil

from common import GOLDEN, REPO, golden_hex

from diglett import proxyproto, wire
from diglett.wire import FrameType

CORPUS = REPO / "fuzz" / "corpus"


def frames():
    golden = [golden_hex("handshake", "preamble"),
              wire.encode_reject(wire.RejectCode.SERVER_KEY_MISMATCH)]
    golden += [bytes.fromhex(r["plaintext"]) for r in GOLDEN["records"]]
    made = [
        wire.encode_frame(FrameType.WINDOW, 1, wire.encode_u32(4096))
        + wire.encode_frame(FrameType.PING, 0, b"pingpong")
        + wire.encode_frame(FrameType.DATA, 1, b"hello"),
        wire.encode_frame(FrameType.FIN, 1) + wire.encode_frame(FrameType.RESET, 2, b"\x00\x06"),
        wire.encode_frame(FrameType.GOAWAY, 0, wire.encode_code_reason(1, "bye")),
        wire.encode_frame(FrameType.ERROR, 0, wire.encode_code_reason(9, "no")),
        wire.encode_frame(FrameType.PONG, 0, b"pingpong"),
    ]
    return golden + made


def length_prefixed(*plaintexts):
    return b"".join(len(p).to_bytes(2, "big") + p for p in plaintexts)


def main():
    f = wire.encode_frame
    acts = {name: golden_hex("handshake", name) for name in ("act_one", "act_two", "act_three")}
    config = bytes.fromhex(GOLDEN["records"][0]["plaintext"])
    ok = bytes.fromhex(GOLDEN["records"][1]["plaintext"])
    open_ = bytes.fromhex(GOLDEN["records"][2]["plaintext"])
    data = bytes.fromhex(GOLDEN["records"][3]["plaintext"])
    seeds = {
        "wire": frames(),
        "handshake": [b"\x00" + acts["act_one"] + acts["act_three"], b"\x01" + acts["act_two"]],
        "session": [
            b"\x00\x00" + length_prefixed(config),  # server, not configured: CONFIG
            b"\x01\x00" + length_prefixed(ok, open_, data),  # agent: OK, OPEN, DATA
            b"\x02\x05" + length_prefixed(  # server, configured, fed 5 bytes at a time
                f(FrameType.DATA, 1, b"hi") + f(FrameType.WINDOW, 2, wire.encode_u32(9)),
                f(FrameType.PING, 0, b"12345678") + f(FrameType.FIN, 1),
                f(FrameType.RESET, 3, b"\x00\x04"),
                f(FrameType.GOAWAY, 0, wire.encode_code_reason(0, "bye"))),
            b"\x03\x00" + length_prefixed(
                f(FrameType.DATA, 1, b"x" * 100) + f(FrameType.OPEN, 4, b'{"remote":"[::1]:5"}'),
                f(FrameType.PONG, 0, b"12345678") + f(FrameType.WINDOW, 1, wire.encode_u32(1))),
            b"\x04\x07" + bytes(40),  # raw bytes: fail the first header tag
        ],
        "proxy": [
            proxyproto.encode_v2(("192.0.2.7", 50000), ("198.51.100.1", 80)) + b"GET /",
            proxyproto.encode_v2(("2001:db8::7", 50000), ("2001:db8::1", 443)),
            proxyproto.encode_local(),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 80\r\nGET /",
            b"PROXY TCP6 2001:db8::7 2001:db8::1 50000 443\r\n",
            b"PROXY UNKNOWN\r\n",
        ],
    }
    shutil.rmtree(CORPUS, ignore_errors=True)
    for target, inputs in seeds.items():
        folder = CORPUS / target
        folder.mkdir(parents=True)
        for number, data in enumerate(inputs):
            (folder / ("seed-%02d" % number)).write_bytes(data)
        print("%s: %d seeds" % (target, len(inputs)))


if __name__ == "__main__":
    main()
