"""The golden transcript of docs/protocol.md: diglett's real prologue, fixed keys, first records.

tests/vectors/golden.json holds every byte an agent and a server exchange from the preamble
to one DATA frame each way; docs/protocol.md prints the same hex. These tests regenerate
the transcript through noise.Initiator/Responder and protocol.Session pairs (every AEAD
backend), replay the stored bytes into each side alone, and check that the document names
every frame type, error code, reject code, limit and agent exit code the code defines.

Regenerate the file after a deliberate wire change with: python -m tests.test_golden
(then paste the new hex into docs/protocol.md; test_doc_shows_every_golden_hex says where).
"""

import json
import re
import sys
from pathlib import Path

import coincurve
import pytest

from diglett import agent, crypto, noise, protocol, wire
from diglett.crypto import available_backends, get_backend, public_key_bytes

REPO = Path(__file__).parents[2]
GOLDEN_PATH = Path(__file__).parents[1] / "vectors" / "golden.json"
DOC_PATH = REPO / "docs" / "protocol.md"
BACKENDS = available_backends()

# Fixed secrets: test-only, never a configuration option.
SECRETS = {
    "server_static": "11" * 32,
    "agent_static": "22" * 32,
    "agent_ephemeral": "33" * 32,
    "server_ephemeral": "44" * 32,
}
CONFIG = {"agent": "diglett/golden", "features": [], "subdomain": "foo"}
OK = {
    "features": [],
    "host": "foo.example.com",
    "max_streams": 16384,
    "ping_interval": 10,
    "port": 40001,
    "server": "diglett/golden",
    "subdomain": "foo",
    "window": 262144,
}
OPEN_INFO = {"remote": "192.0.2.7:50000"}
CLIENT_BYTES = b"hello from the client\n"
BACKEND_BYTES = b"hello from the backend\n"


def _key(name):
    return coincurve.PrivateKey(bytes.fromhex(SECRETS[name]))


def _record(direction, name, frames_plaintext, nonce, record):
    return {
        "name": name,
        "from": direction,
        "nonces": [nonce, nonce + 1],
        "plaintext": frames_plaintext.hex(),
        "hex": record.hex(),
    }


def _seal(session, direction, name, records):
    """Take the sender's next record, noting the nonce it was sealed with."""
    nonce = session._send_cipher.nonce
    data = session.data_to_send()
    records.append((direction, name, nonce, data))
    return data


def generate(backend="auto"):
    """Run a whole handshake and the first records in memory; returns the golden dict."""
    server_static, agent_static = _key("server_static"), _key("agent_static")
    preamble = wire.encode_preamble()
    prologue = wire.prologue(preamble)
    initiator = noise.Initiator(agent_static, public_key_bytes(server_static), prologue,
                                aead=get_backend(backend), ephemeral_key=_key("agent_ephemeral"))
    responder = noise.Responder([server_static], prologue, aead=get_backend(backend),
                                ephemeral_key=_key("server_ephemeral"))
    act_one = initiator.act_one()
    act_two = responder.read_act_one(act_one)
    act_three = initiator.read_act_two(act_two)
    assert responder.read_act_three(act_three) == public_key_bytes(agent_static)
    assert initiator.handshake_hash == responder.handshake_hash
    transport = {
        "ck": initiator.send_cipher._chaining_key.hex(),
        "agent_to_server_key": initiator.send_cipher._key.hex(),
        "server_to_agent_key": initiator.recv_cipher._key.hex(),
    }

    agent_side = protocol.Session(protocol.AGENT, initiator.send_cipher, initiator.recv_cipher,
                                  window=None)
    server_side = protocol.Session(protocol.SERVER, responder.send_cipher, responder.recv_cipher,
                                   window=OK["window"], max_streams=OK["max_streams"])
    records = []

    agent_side.send_config(CONFIG)
    events = server_side.receive_data(_seal(agent_side, "agent", "config", records))
    assert events == [protocol.ConfigReceived(CONFIG)]

    server_side.accept(OK)
    events = agent_side.receive_data(_seal(server_side, "server", "ok", records))
    assert events == [protocol.Accepted(OK)]

    stream_id = server_side.open_stream(OPEN_INFO)
    assert stream_id == 1
    events = agent_side.receive_data(_seal(server_side, "server", "open", records))
    assert events == [protocol.StreamOpened(1, OPEN_INFO)]

    assert server_side.send_data(1, CLIENT_BYTES)
    events = agent_side.receive_data(_seal(server_side, "server", "data", records))
    assert events == [protocol.DataReceived(1, CLIENT_BYTES)]

    assert agent_side.send_data(1, BACKEND_BYTES)
    events = server_side.receive_data(_seal(agent_side, "agent", "data", records))
    assert events == [protocol.DataReceived(1, BACKEND_BYTES)]

    # Recover each record's plaintext with fresh ciphers in the same starting state.
    plain = {"agent": _twin_open(backend, transport["agent_to_server_key"], transport["ck"]),
             "server": _twin_open(backend, transport["server_to_agent_key"], transport["ck"])}
    h = initiator.handshake_hash
    keys = {}
    for name, secret in SECRETS.items():
        keys[name + "_priv"] = secret
        keys[name + "_pub"] = public_key_bytes(_key(name)).hex()
    return {
        "description": "diglett wire v2 golden transcript; see docs/protocol.md, Test vectors",
        "keys": keys,
        "prologue": prologue.hex(),
        "handshake": {
            "preamble": preamble.hex(),
            "act_one": act_one.hex(),
            "act_two": act_two.hex(),
            "act_three": act_three.hex(),
        },
        "derived": {
            "handshake_hash": h.hex(),
            "session_id": h[:8].hex(),
            **transport,
        },
        "records": [
            _record(direction, name, plain[direction](data), nonce, data)
            for direction, name, nonce, data in records
        ],
    }


def _twin_open(backend, key_hex, ck_hex):
    cipher = crypto.TransportCipher(bytes.fromhex(key_hex), bytes.fromhex(ck_hex),
                                    get_backend(backend))

    def open_record(record):
        cipher.open_length(record[:crypto.RECORD_HEADER_SIZE])
        return cipher.open_body(record[crypto.RECORD_HEADER_SIZE:])

    return open_record


def load_golden():
    return json.loads(GOLDEN_PATH.read_text())


@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _hex(value):
    return bytes.fromhex(value)


# --- the transcript, byte for byte ---------------------------------------------------------


def test_regenerated_transcript_matches_golden(golden, backend):
    assert generate(backend) == golden


def test_sizes_and_shapes(golden):
    hs = golden["handshake"]
    assert [len(_hex(hs[n])) for n in ("preamble", "act_one", "act_two", "act_three")] == [
        wire.PREAMBLE_SIZE, noise.ACT_ONE_SIZE, noise.ACT_TWO_SIZE, noise.ACT_THREE_SIZE]
    assert _hex(golden["prologue"]) == wire.PROLOGUE_LABEL + _hex(hs["preamble"])
    assert golden["derived"]["session_id"] == golden["derived"]["handshake_hash"][:16]
    for record in golden["records"]:
        plaintext = _hex(record["plaintext"])
        assert len(_hex(record["hex"])) == crypto.RECORD_HEADER_SIZE + len(plaintext) + 16
    names = [(r["from"], r["name"]) for r in golden["records"]]
    assert names == [("agent", "config"), ("server", "ok"), ("server", "open"),
                     ("server", "data"), ("agent", "data")]


def test_config_plaintext_is_what_send_config_encodes(golden):
    frame = wire.decode_frames(_hex(golden["records"][0]["plaintext"]))
    assert frame == [wire.Frame(wire.FrameType.CONFIG, 0,
                                b'{"agent":"diglett/golden","features":[],"subdomain":"foo"}')]


def test_responder_fed_agent_messages_produces_server_messages(golden, backend):
    """The server side alone: stored agent bytes in, stored server bytes out."""
    hs = golden["handshake"]
    server_static = _key("server_static")
    preamble = wire.parse_preamble(_hex(hs["preamble"]))
    assert preamble == wire.Preamble(wire.WIRE_VERSION, wire.WIRE_VERSION, 0)
    responder = noise.Responder(server_static, wire.prologue(_hex(hs["preamble"])),
                                aead=get_backend(backend), ephemeral_key=_key("server_ephemeral"))
    assert responder.read_act_one(_hex(hs["act_one"])).hex() == hs["act_two"]
    remote = responder.read_act_three(_hex(hs["act_three"]))
    assert remote.hex() == golden["keys"]["agent_static_pub"]
    assert responder.handshake_hash.hex() == golden["derived"]["handshake_hash"]

    server = protocol.Session(protocol.SERVER, responder.send_cipher, responder.recv_cipher,
                              window=OK["window"], max_streams=OK["max_streams"])
    config, ok, open_, down, up = (_hex(r["hex"]) for r in golden["records"])
    # One byte at a time: a record is never decrypted before it is complete.
    events = []
    for i in range(len(config)):
        events += server.receive_data(config[i:i + 1])
    assert events == [protocol.ConfigReceived(CONFIG)]
    server.accept(OK)
    assert server.data_to_send() == ok
    assert server.open_stream(OPEN_INFO) == 1
    assert server.data_to_send() == open_
    server.send_data(1, CLIENT_BYTES)
    assert server.data_to_send() == down
    assert server.receive_data(up) == [protocol.DataReceived(1, BACKEND_BYTES)]


def test_initiator_fed_server_messages_produces_agent_messages(golden, backend):
    """The agent side alone: stored server bytes in, stored agent bytes out."""
    hs = golden["handshake"]
    initiator = noise.Initiator(_key("agent_static"), _hex(golden["keys"]["server_static_pub"]),
                                _hex(golden["prologue"]), aead=get_backend(backend),
                                ephemeral_key=_key("agent_ephemeral"))
    assert initiator.act_one().hex() == hs["act_one"]
    assert initiator.read_act_two(_hex(hs["act_two"])).hex() == hs["act_three"]
    agent_side = protocol.Session(protocol.AGENT, initiator.send_cipher, initiator.recv_cipher,
                                  window=None)
    config, ok, open_, down, up = (_hex(r["hex"]) for r in golden["records"])
    agent_side.send_config(CONFIG)
    assert agent_side.data_to_send() == config
    assert agent_side.receive_data(ok + open_ + down) == [
        protocol.Accepted(OK), protocol.StreamOpened(1, OPEN_INFO),
        protocol.DataReceived(1, CLIENT_BYTES)]
    assert agent_side.window == OK["window"]
    agent_side.send_data(1, BACKEND_BYTES)
    assert agent_side.data_to_send() == up


def test_flipped_bit_in_a_golden_record_is_fatal(golden):
    responder = noise.Responder(_key("server_static"), _hex(golden["prologue"]),
                                ephemeral_key=_key("server_ephemeral"))
    responder.read_act_one(_hex(golden["handshake"]["act_one"]))
    responder.read_act_three(_hex(golden["handshake"]["act_three"]))
    server = protocol.Session(protocol.SERVER, responder.send_cipher, responder.recv_cipher)
    record = bytearray(_hex(golden["records"][0]["hex"]))
    record[-1] ^= 0x01
    with pytest.raises(wire.ProtocolError, match="bad record tag"):
        server.receive_data(bytes(record))


# --- the document cannot drift from the code -----------------------------------------------


@pytest.fixture(scope="module")
def doc():
    return DOC_PATH.read_text()


def _hex_strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _hex_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _hex_strings(value)
    elif isinstance(node, str) and re.fullmatch(r"(?:[0-9a-f]{2})+", node):
        yield node


def test_doc_shows_every_golden_hex(golden, doc):
    strings = list(_hex_strings(golden))
    assert len(strings) > 20
    missing = [s for s in strings if s not in doc]
    assert not missing, "docs/protocol.md lacks these golden.json values: %s" % missing


def _table_rows(doc):
    return [line for line in doc.splitlines() if line.startswith("|")]


def test_every_frame_type_is_documented(doc):
    rows = _table_rows(doc)
    for ftype in wire.FrameType:
        assert any("0x%02X" % ftype in row and "`%s`" % ftype.name in row for row in rows), (
            "docs/protocol.md has no table row for frame type 0x%02X %s" % (ftype, ftype.name))


def test_every_error_code_is_documented(doc):
    rows = _table_rows(doc)
    for code in wire.ErrorCode:
        assert any(re.match(r"\|\s*%d\s*\|\s*`%s`" % (code, code.name), row) for row in rows), (
            "docs/protocol.md has no table row for error code %d %s" % (code, code.name))


def test_every_reject_code_is_documented(doc):
    rows = _table_rows(doc)
    for code in wire.RejectCode:
        assert any(re.match(r"\|\s*%d\s*\|\s*`%s`" % (code, code.name), row) for row in rows), (
            "docs/protocol.md has no table row for reject code %d %s" % (code, code.name))


@pytest.mark.parametrize("module, name", [
    (wire, "PREAMBLE_SIZE"), (wire, "FRAME_HEADER_SIZE"), (wire, "MAX_RECORD_PLAINTEXT"),
    (wire, "MAX_DATA_PAYLOAD"), (wire, "MAX_CONFIG_SIZE"), (wire, "MAX_OPEN_INFO_SIZE"),
    (wire, "MAX_REASON_SIZE"), (wire, "MAX_STREAM_ID"), (wire, "MAX_WINDOW"),
    (wire, "PING_SIZE"), (wire, "WIRE_VERSION"), (crypto, "KEY_ROTATION_NONCE"),
    (crypto, "RECORD_HEADER_SIZE"), (protocol, "DEFAULT_WINDOW"),
    (protocol, "DEFAULT_MAX_STREAMS"), (protocol, "MAX_PENDING_PONGS"),
])
def test_every_limit_is_documented_with_its_value(doc, module, name):
    value = getattr(module, name)
    rows = [row for row in _table_rows(doc) if "`%s`" % name in row]
    assert rows, "docs/protocol.md has no table row for %s" % name
    assert any(re.search(r"\b%d\b" % value, row) for row in rows), (
        "docs/protocol.md gives %s a value other than %d" % (name, value))


def test_every_agent_exit_code_is_documented(doc):
    rows = _table_rows(doc)
    exits = {n: v for n, v in vars(agent).items() if n.startswith("EXIT_")}
    assert len(exits) >= 8
    for name, value in exits.items():
        assert any("`%s`" % name in row and re.search(r"\|\s*%d\s*\|" % value, row)
                   for row in rows), "docs/protocol.md has no row for %s = %d" % (name, value)


if __name__ == "__main__":
    GOLDEN_PATH.write_text(json.dumps(generate(), indent=2) + "\n")
    print("wrote %s" % GOLDEN_PATH, file=sys.stderr)
