"""diglett.noise: the BOLT 8 handshake, byte for byte against Appendix A, and its misuse rules."""

import json
import subprocess
import sys
from pathlib import Path

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diglett import noise
from diglett.crypto import (
    RECORD_HEADER_SIZE,
    KeyFormatError,
    TransportCipher,
    available_backends,
    get_backend,
    public_key_bytes,
)
from diglett.noise import (
    ACT_ONE_SIZE,
    ACT_THREE_SIZE,
    ACT_TWO_SIZE,
    HandshakeError,
    Initiator,
    Responder,
)

REPO = Path(__file__).parents[2]
VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "bolt8.json").read_text())
PROLOGUE = VECTORS["prologue"].encode()
HANDSHAKE = {name: bytes.fromhex(value) for name, value in VECTORS["handshake"].items()}
BACKENDS = available_backends()


def private(hex_key):
    return coincurve.PrivateKey(bytes.fromhex(hex_key))


def vector_initiator(backend):
    side = VECTORS["initiator"]
    return Initiator(
        private(side["ls_priv"]),
        bytes.fromhex(side["rs_pub"]),
        PROLOGUE,
        aead=get_backend(backend),
        ephemeral_key=private(side["e_priv"]),
    )


def vector_responder(backend, static_keys=None):
    side = VECTORS["responder"]
    return Responder(
        static_keys if static_keys is not None else private(side["ls_priv"]),
        PROLOGUE,
        aead=get_backend(backend),
        ephemeral_key=private(side["e_priv"]),
    )


def reference_cipher(backend, key_name):
    return TransportCipher(HANDSHAKE[key_name], HANDSHAKE["ck"], get_backend(backend))


def assert_same_cipher(cipher, reference):
    """Same key, chaining key and nonce: identical records, including after a rotation."""
    for _ in range(501):
        assert cipher.seal(b"hello") == reference.seal(b"hello")


def connect(prologue=b"test", server_keys=None, pinned=None, backend="auto"):
    """A full handshake between fresh keys; returns (initiator, responder)."""
    server_keys = server_keys or [coincurve.PrivateKey()]
    agent_key = coincurve.PrivateKey()
    pinned = pinned if pinned is not None else public_key_bytes(server_keys[0])
    initiator = Initiator(agent_key, pinned, prologue, aead=get_backend(backend))
    responder = Responder(server_keys, prologue, aead=get_backend(backend))
    act_two = responder.read_act_one(initiator.act_one())
    assert responder.read_act_three(initiator.read_act_two(act_two)) == public_key_bytes(agent_key)
    return initiator, responder


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# --- Appendix A, byte for byte ------------------------------------------------------------


def test_constants():
    assert noise.PROTOCOL_NAME == b"Noise_XK_secp256k1_ChaChaPoly_SHA256"
    assert (ACT_ONE_SIZE, ACT_TWO_SIZE, ACT_THREE_SIZE) == (50, 50, 66)
    assert [len(HANDSHAKE[a]) for a in ("act_one", "act_two", "act_three")] == [50, 50, 66]


def test_vector_keys_match():
    for side in ("initiator", "responder"):
        keys = VECTORS[side]
        assert public_key_bytes(private(keys["ls_priv"])).hex() == keys["ls_pub"]
        assert public_key_bytes(private(keys["e_priv"])).hex() == keys["e_pub"]


def test_initiator_successful_handshake(backend):
    initiator = vector_initiator(backend)
    assert initiator.act_one() == HANDSHAKE["act_one"]
    assert initiator.read_act_two(HANDSHAKE["act_two"]) == HANDSHAKE["act_three"]
    assert initiator.handshake_hash == HANDSHAKE["h"]
    assert_same_cipher(initiator.send_cipher, reference_cipher(backend, "initiator_sk"))
    assert_same_cipher(initiator.recv_cipher, reference_cipher(backend, "initiator_rk"))


def test_initiator_first_record_is_bolt8_message_zero(backend):
    initiator = vector_initiator(backend)
    initiator.act_one()
    initiator.read_act_two(HANDSHAKE["act_two"])
    assert initiator.send_cipher.seal(b"hello").hex() == VECTORS["messages"]["outputs"]["0"]


def test_responder_successful_handshake(backend):
    responder = vector_responder(backend)
    assert responder.read_act_one(HANDSHAKE["act_one"]) == HANDSHAKE["act_two"]
    remote = responder.read_act_three(HANDSHAKE["act_three"])
    assert remote.hex() == VECTORS["initiator"]["ls_pub"]
    assert responder.remote_static == remote
    assert responder.local_static.secret == bytes.fromhex(VECTORS["responder"]["ls_priv"])
    assert responder.handshake_hash == HANDSHAKE["h"]
    # rk,sk = the initiator's sk,rk.
    assert_same_cipher(responder.recv_cipher, reference_cipher(backend, "initiator_sk"))
    assert_same_cipher(responder.send_cipher, reference_cipher(backend, "initiator_rk"))


@pytest.mark.parametrize("case", VECTORS["initiator_failures"], ids=lambda c: c["name"])
def test_initiator_failure_vectors(backend, case):
    initiator = vector_initiator(backend)
    assert initiator.act_one() == HANDSHAKE["act_one"]
    with pytest.raises(HandshakeError) as info:
        initiator.read_act_two(bytes.fromhex(case["act_two"]))
    assert info.value.reason == case["reason"]
    assert str(info.value) == case["reason"]
    with pytest.raises(RuntimeError):  # the object is dead
        initiator.read_act_two(HANDSHAKE["act_two"])
    with pytest.raises(RuntimeError):
        initiator.send_cipher


@pytest.mark.parametrize("case", VECTORS["responder_failures"], ids=lambda c: c["name"])
def test_responder_failure_vectors(backend, case):
    responder = vector_responder(backend)
    act_one = bytes.fromhex(case["act_one"])
    with pytest.raises(HandshakeError) as info:
        if "act_three" in case:  # act one is good: the failure must come from act three
            assert responder.read_act_one(act_one).hex() == case["act_two"]
            responder.read_act_three(bytes.fromhex(case["act_three"]))
        else:
            responder.read_act_one(act_one)
    assert info.value.reason == case["reason"]
    assert str(info.value) == case["reason"]
    assert responder.remote_static is None
    with pytest.raises(RuntimeError):
        responder.read_act_three(HANDSHAKE["act_three"])
    with pytest.raises(RuntimeError):
        responder.recv_cipher


def test_failure_vectors_cover_every_reason():
    reasons = {c["reason"] for c in VECTORS["initiator_failures"] + VECTORS["responder_failures"]}
    assert reasons == {
        "short read",
        "act1 bad version", "act1 bad key", "act1 bad tag",
        "act2 bad version", "act2 bad key", "act2 bad tag",
        "act3 bad version", "act3 bad key", "act3 bad rs", "act3 bad tag",
    }


# --- beyond the vectors ---------------------------------------------------------------------


def test_fresh_handshake_both_directions(backend):
    initiator, responder = connect(backend=backend)
    assert initiator.handshake_hash == responder.handshake_hash
    assert len(initiator.handshake_hash) == 32
    for sender, receiver in ((initiator.send_cipher, responder.recv_cipher),
                             (responder.send_cipher, initiator.recv_cipher)):
        for payload in (b"ping", b"x" * 5000):
            record = sender.seal(payload)
            receiver.open_length(record[:RECORD_HEADER_SIZE])
            assert receiver.open_body(record[RECORD_HEADER_SIZE:]) == payload


def test_fresh_handshakes_differ():
    server = [coincurve.PrivateKey()]
    first, _ = connect(server_keys=server)
    second, _ = connect(server_keys=server)
    assert first.handshake_hash != second.handshake_hash


def test_responder_key_rotation_picks_matching_key():
    old, new, other = coincurve.PrivateKey(), coincurve.PrivateKey(), coincurve.PrivateKey()
    for pinned in (old, new):
        _, responder = connect(server_keys=[new, old], pinned=public_key_bytes(pinned))
        assert responder.local_static is pinned
    with pytest.raises(HandshakeError, match="act1 bad tag"):
        connect(server_keys=[new, old], pinned=public_key_bytes(other))


def test_responder_vector_with_rotated_keys(backend):
    keys = [coincurve.PrivateKey(b"\x33" * 32), private(VECTORS["responder"]["ls_priv"])]
    responder = vector_responder(backend, keys)
    assert responder.read_act_one(HANDSHAKE["act_one"]) == HANDSHAKE["act_two"]
    assert responder.local_static is keys[1]
    assert responder.read_act_three(HANDSHAKE["act_three"]).hex() == VECTORS["initiator"]["ls_pub"]


def test_responder_needs_a_key():
    with pytest.raises(ValueError):
        Responder([], b"p")


def test_prologue_mismatch_fails_act_one():
    server = coincurve.PrivateKey()
    initiator = Initiator(coincurve.PrivateKey(), public_key_bytes(server), b"diglett-wire\x01")
    responder = Responder(server, b"diglett-wire\x02")
    with pytest.raises(HandshakeError, match="act1 bad tag"):
        responder.read_act_one(initiator.act_one())


def test_impostor_server_fails_act_two():
    """A server without the pinned key cannot make act two: the agent's "server key mismatch"."""
    pinned, impostor_key = coincurve.PrivateKey(), coincurve.PrivateKey()
    initiator = Initiator(coincurve.PrivateKey(), public_key_bytes(pinned), b"p")
    act_one = initiator.act_one()
    # The impostor skips the act-one check (it cannot pass it) and answers with its own key.
    impostor = Responder(impostor_key, b"p")
    impostor._aead = _AcceptAnyTag(impostor._aead)
    act_two = impostor.read_act_one(act_one)
    with pytest.raises(HandshakeError, match="act2 bad tag"):
        initiator.read_act_two(act_two)


class _AcceptAnyTag:
    """An AEAD that skips verification on open, to build a forged act two."""

    def __init__(self, aead):
        self.name, self._aead = "forgery", aead

    def seal(self, *args):
        return self._aead.seal(*args)

    def open(self, key, nonce, ad, data):
        return b""


def test_initiator_rejects_bad_pin():
    with pytest.raises(KeyFormatError):
        Initiator(coincurve.PrivateKey(), b"\x04" + bytes(32), b"p")


def test_call_order_initiator():
    initiator = Initiator(coincurve.PrivateKey(), public_key_bytes(coincurve.PrivateKey()), b"p")
    with pytest.raises(RuntimeError):
        initiator.read_act_two(HANDSHAKE["act_two"])
    with pytest.raises(RuntimeError):
        initiator.handshake_hash
    initiator.act_one()
    with pytest.raises(RuntimeError):
        initiator.act_one()


def test_call_order_responder():
    responder = Responder(coincurve.PrivateKey(), b"p")
    with pytest.raises(RuntimeError):
        responder.read_act_three(HANDSHAKE["act_three"])
    with pytest.raises(RuntimeError):
        responder.send_cipher


def test_steps_run_once():
    initiator, responder = connect()
    with pytest.raises(RuntimeError):
        initiator.read_act_two(HANDSHAKE["act_two"])
    with pytest.raises(RuntimeError):
        responder.read_act_one(HANDSHAKE["act_one"])
    with pytest.raises(RuntimeError):
        responder.read_act_three(HANDSHAKE["act_three"])


def test_accepts_bytes_like_input(backend):
    responder = vector_responder(backend)
    assert responder.read_act_one(bytearray(HANDSHAKE["act_one"])) == HANDSHAKE["act_two"]
    assert responder.read_act_three(memoryview(HANDSHAKE["act_three"])).hex() == (
        VECTORS["initiator"]["ls_pub"]
    )


@pytest.mark.parametrize("size", [0, ACT_ONE_SIZE - 1, ACT_ONE_SIZE + 1])
def test_wrong_size_is_short_read(size):
    responder = Responder(coincurve.PrivateKey(), b"p")
    with pytest.raises(HandshakeError, match="short read"):
        responder.read_act_one(bytes(size))


def test_act_one_not_on_curve_is_bad_key():
    act_one = bytearray(HANDSHAKE["act_one"])
    act_one[2:34] = (5).to_bytes(32, "big")  # x = 5 is not on secp256k1
    with pytest.raises(HandshakeError, match="act1 bad key"):
        vector_responder("auto").read_act_one(bytes(act_one))


@settings(max_examples=50, deadline=None)
@given(act_one=st.binary(min_size=ACT_ONE_SIZE, max_size=ACT_ONE_SIZE))
def test_random_act_one_only_raises_handshake_error(act_one):
    with pytest.raises(HandshakeError):
        Responder(coincurve.PrivateKey(), b"p").read_act_one(act_one)


@settings(max_examples=50, deadline=None)
@given(act_three=st.binary(min_size=ACT_THREE_SIZE, max_size=ACT_THREE_SIZE))
def test_random_act_three_only_raises_handshake_error(act_three):
    responder = vector_responder("auto")
    responder.read_act_one(HANDSHAKE["act_one"])
    with pytest.raises(HandshakeError):
        responder.read_act_three(act_three)


@settings(max_examples=30, deadline=None)
@given(position=st.integers(0, ACT_THREE_SIZE - 1), bit=st.integers(0, 7))
def test_any_bit_flip_in_act_three_fails(position, bit):
    act_three = bytearray(HANDSHAKE["act_three"])
    act_three[position] ^= 1 << bit
    responder = vector_responder("auto")
    responder.read_act_one(HANDSHAKE["act_one"])
    with pytest.raises(HandshakeError):
        responder.read_act_three(bytes(act_three))


# --- layering ----------------------------------------------------------------------------------


def test_sans_io_modules_import_no_io():
    """crypto and noise must stay free of sockets, gevent, the database and signals."""
    code = (
        "import sys, diglett.crypto, diglett.noise; "
        "bad = sorted(m for m in ('socket', '_socket', 'ssl', 'gevent', 'peewee', 'blinker', "
        "'diglett.wire', 'diglett.registry', 'diglett.signals') if m in sys.modules); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, "imported: %s %s" % (result.stdout, result.stderr)
