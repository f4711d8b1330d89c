"""diglett.crypto: HKDF, the AEAD backends, the BOLT 8 record cipher, keys and key files.

Why ~500 lines: one subject, crypto.py: the published vectors of each primitive and the key
files; the tests share nothing but the vectors.
"""

import json
import os
import stat
from pathlib import Path

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diglett import crypto
from diglett.crypto import (
    MAX_RECORD_PLAINTEXT,
    RECORD_HEADER_SIZE,
    TAG_SIZE,
    DecryptError,
    KeyFileError,
    KeyFormatError,
    TransportCipher,
    available_backends,
    get_backend,
    hkdf2,
)

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "bolt8.json").read_text())
BACKENDS = available_backends()
HAS_BOTH = set(BACKENDS) == {"cryptography", "pycryptodome"}
needs_both = pytest.mark.skipif(not HAS_BOTH, reason="needs the cryptography backend too")

KEY = bytes(range(32))
CHAINING_KEY = bytes(range(32, 64))
keys32 = st.binary(min_size=32, max_size=32)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def cipher_pair(backend, key=KEY, chaining_key=CHAINING_KEY):
    """A sender and a receiver for one direction, each with its own backend object."""
    return (
        TransportCipher(key, chaining_key, get_backend(backend)),
        TransportCipher(key, chaining_key, get_backend(backend)),
    )


def open_record(receiver, record):
    length = receiver.open_length(record[:RECORD_HEADER_SIZE])
    assert len(record) == RECORD_HEADER_SIZE + length + TAG_SIZE
    return receiver.open_body(record[RECORD_HEADER_SIZE:])


# --- HKDF -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["hkdf"], ids=lambda c: c["ikm"][:8] or "empty")
def test_hkdf2_bolt8_intermediates(case):
    out1, out2 = hkdf2(bytes.fromhex(case["salt"]), bytes.fromhex(case["ikm"]))
    assert (out1.hex(), out2.hex()) == (case["out1"], case["out2"])


def test_hkdf2_rfc5869_case3():
    # RFC 5869 A.3: SHA-256, empty salt and info, L=42 (a prefix of our 64 bytes).
    out1, out2 = hkdf2(b"", b"\x0b" * 22)
    expected = "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    assert (out1 + out2)[:42].hex() == expected


@pytest.mark.skipif("cryptography" not in BACKENDS, reason="needs cryptography")
@settings(max_examples=30, deadline=None)
@given(salt=st.binary(max_size=80), ikm=st.binary(max_size=80))
def test_hkdf2_matches_cryptography(salt, ikm):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    expected = HKDF(hashes.SHA256(), 64, salt, b"").derive(ikm)
    out1, out2 = hkdf2(salt, ikm)
    assert len(out1) == len(out2) == 32
    assert out1 + out2 == expected


# --- AEAD backends ----------------------------------------------------------------------


def test_available_backends():
    assert "pycryptodome" in BACKENDS
    assert BACKENDS[0] == get_backend().name  # auto picks the first (fastest)


def test_auto_prefers_cryptography():
    if "cryptography" in BACKENDS:
        assert get_backend("auto").name == "cryptography"
    else:
        assert get_backend("auto").name == "pycryptodome"


def test_get_backend_by_name(backend):
    assert get_backend(backend).name == backend


def test_get_backend_unknown_name():
    with pytest.raises(ValueError, match="unknown AEAD backend 'openssl'.*pycryptodome"):
        get_backend("openssl")


def test_get_backend_unavailable(monkeypatch):
    monkeypatch.setattr(crypto, "ChaCha20Poly1305", None)
    assert available_backends() == ["pycryptodome"]
    assert get_backend().name == "pycryptodome"
    with pytest.raises(ValueError, match="not available.*pip install"):
        get_backend("cryptography")


def test_aead_round_trip_and_layout(backend):
    aead = get_backend(backend)
    sealed = aead.seal(KEY, 7, b"ad", b"payload")
    assert len(sealed) == len(b"payload") + TAG_SIZE
    assert aead.open(KEY, 7, b"ad", sealed) == b"payload"
    assert aead.open(KEY, 7, b"ad", bytearray(sealed)) == b"payload"
    assert aead.seal(KEY, 0, b"", b"") != aead.seal(KEY, 1, b"", b"")  # the nonce matters


@pytest.mark.parametrize(
    "change",
    ["key", "nonce", "ad", "ciphertext", "tag", "truncate", "too_short"],
)
def test_aead_open_rejects(backend, change):
    aead = get_backend(backend)
    sealed = bytearray(aead.seal(KEY, 7, b"ad", b"payload"))
    key, nonce, ad = KEY, 7, b"ad"
    if change == "key":
        key = CHAINING_KEY
    elif change == "nonce":
        nonce = 8
    elif change == "ad":
        ad = b"AD"
    elif change == "ciphertext":
        sealed[0] ^= 1
    elif change == "tag":
        sealed[-1] ^= 0x80
    elif change == "truncate":
        sealed = sealed[:-1]
    else:
        sealed = sealed[:TAG_SIZE - 1]
    with pytest.raises(DecryptError):
        aead.open(key, nonce, ad, bytes(sealed))


def test_nonce_encoding_is_bolt8(backend):
    # 4 zero bytes then little-endian u64: compare against pycryptodome driven directly.
    from Crypto.Cipher import ChaCha20_Poly1305

    nonce = 0x0102030405060708
    cipher = ChaCha20_Poly1305.new(key=KEY, nonce=b"\x00" * 4 + nonce.to_bytes(8, "little"))
    cipher.update(b"ad")
    ciphertext, tag = cipher.encrypt_and_digest(b"abc")
    assert get_backend(backend).seal(KEY, nonce, b"ad", b"abc") == ciphertext + tag


@needs_both
@settings(max_examples=40, deadline=None)
@given(key=keys32, nonce=st.integers(0, 2**64 - 1), ad=st.binary(max_size=40), pt=st.binary(max_size=300))
def test_backends_agree(key, nonce, ad, pt):
    fast, slow = get_backend("cryptography"), get_backend("pycryptodome")
    sealed = fast.seal(key, nonce, ad, pt)
    assert sealed == slow.seal(key, nonce, ad, pt)
    assert slow.open(key, nonce, ad, sealed) == pt


@pytest.mark.skipif("cryptography" not in BACKENDS, reason="needs cryptography")
def test_cryptography_key_cache_is_bounded():
    aead = get_backend("cryptography")
    keys = [bytes([i]) * 32 for i in range(40)]
    for key in keys:
        assert aead.open(key, 1, b"", aead.seal(key, 1, b"", b"x")) == b"x"
    assert 0 < len(aead._ciphers) <= crypto._AEAD_KEY_CACHE_SIZE
    assert aead.open(keys[0], 2, b"", aead.seal(keys[0], 2, b"", b"y")) == b"y"  # evicted: rebuilt


# --- TransportCipher ----------------------------------------------------------------------


def test_bolt8_message_vectors(backend):
    """BOLT 8 "transport-message test": records 0, 1, 500, 501, 1000, 1001 across 2 rotations."""
    vector = VECTORS["messages"]
    expected = {int(index): value for index, value in vector["outputs"].items()}
    sender, receiver = cipher_pair(
        backend, bytes.fromhex(vector["sk"]), bytes.fromhex(vector["ck"])
    )
    plaintext = bytes.fromhex(vector["plaintext"])
    for index in range(max(expected) + 1):
        record = sender.seal(plaintext)
        if index in expected:
            assert record.hex() == expected[index], "record %d" % index
        assert open_record(receiver, record) == plaintext
    assert (sender.rotations, receiver.rotations) == (2, 2)
    assert sender.nonce == receiver.nonce == 4


def test_nonce_and_rotation_counters(backend):
    sender, receiver = cipher_pair(backend)
    assert (sender.nonce, sender.rotations) == (0, 0)
    record = sender.seal(b"x")
    assert (sender.nonce, sender.rotations) == (2, 0)
    receiver.open_length(record[:RECORD_HEADER_SIZE])
    assert receiver.nonce == 1
    receiver.open_body(record[RECORD_HEADER_SIZE:])
    assert receiver.nonce == 2
    for _ in range(498):
        sender.seal(b"x")
    assert (sender.nonce, sender.rotations) == (998, 0)
    sender.seal(b"x")
    assert (sender.nonce, sender.rotations) == (0, 1)


def test_rotation_uses_hkdf_of_chaining_key_and_key(backend):
    sender, _ = cipher_pair(backend)
    for _ in range(500):
        sender.seal(b"x")
    new_ck, new_key = hkdf2(CHAINING_KEY, KEY)
    reference = TransportCipher(new_key, new_ck, get_backend(backend))
    assert sender.seal(b"after rotation") == reference.seal(b"after rotation")


@pytest.mark.parametrize("size", [1, 2, 1000, MAX_RECORD_PLAINTEXT])
def test_record_sizes(backend, size):
    sender, receiver = cipher_pair(backend)
    payload = os.urandom(size)
    record = sender.seal(payload)
    assert len(record) == RECORD_HEADER_SIZE + size + TAG_SIZE
    assert open_record(receiver, record) == payload


@pytest.mark.parametrize("size", [0, MAX_RECORD_PLAINTEXT + 1])
def test_seal_rejects_bad_sizes(backend, size):
    sender, _ = cipher_pair(backend)
    with pytest.raises(ValueError, match="1..65535"):
        sender.seal(b"x" * size)
    assert sender.nonce == 0


@settings(max_examples=25, deadline=None)
@given(payloads=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=8))
def test_round_trip_property(payloads):
    for backend in BACKENDS:
        sender, receiver = cipher_pair(backend)
        for payload in payloads:
            assert open_record(receiver, sender.seal(payload)) == payload


def test_seal_accepts_bytes_like(backend):
    sender, receiver = cipher_pair(backend)
    for payload in (bytearray(b"abc"), memoryview(b"defg")):
        assert open_record(receiver, sender.seal(payload)) == bytes(payload)


# Offsets of one bit in each region of a 5-byte record: 18-byte header, then 5 + 16 body.
TAMPER_REGIONS = {
    "length ciphertext": 0,
    "length tag": 2,
    "body ciphertext": RECORD_HEADER_SIZE,
    "body tag": RECORD_HEADER_SIZE + 5,
}


@pytest.mark.parametrize("region", TAMPER_REGIONS)
@pytest.mark.parametrize("bit", [0, 7])
def test_tampered_record_is_rejected(backend, region, bit):
    sender, receiver = cipher_pair(backend)
    record = sender.seal(b"hello")
    tampered = bytearray(record)
    tampered[TAMPER_REGIONS[region] + (bit % 2)] ^= 1 << bit
    tampered = bytes(tampered)
    in_header = TAMPER_REGIONS[region] < RECORD_HEADER_SIZE
    with pytest.raises(DecryptError, match="bad record length tag" if in_header else "bad record tag"):
        open_record(receiver, tampered)
    # A failed decrypt does not advance the nonce: the genuine record still opens.
    assert receiver.nonce == (0 if in_header else 1)
    if not in_header:
        assert receiver.open_body(record[RECORD_HEADER_SIZE:]) == b"hello"
    else:
        assert open_record(receiver, record) == b"hello"


def test_duplicated_record_is_rejected(backend):
    sender, receiver = cipher_pair(backend)
    first = sender.seal(b"one")
    assert open_record(receiver, first) == b"one"
    with pytest.raises(DecryptError, match="bad record length tag"):
        open_record(receiver, first)


def test_swapped_records_are_rejected(backend):
    sender, receiver = cipher_pair(backend)
    sender.seal(b"one")
    second = sender.seal(b"two")
    with pytest.raises(DecryptError):
        open_record(receiver, second)


def test_dropped_record_is_rejected(backend):
    sender, receiver = cipher_pair(backend)
    open_record(receiver, sender.seal(b"one"))
    sender.seal(b"two")  # lost on the way
    with pytest.raises(DecryptError):
        open_record(receiver, sender.seal(b"three"))


def test_header_and_body_of_different_records_do_not_mix(backend):
    sender, receiver = cipher_pair(backend)
    first, second = sender.seal(b"aaaaa"), sender.seal(b"bbbbb")
    receiver.open_length(first[:RECORD_HEADER_SIZE])
    with pytest.raises(DecryptError, match="bad record tag"):
        receiver.open_body(second[RECORD_HEADER_SIZE:])


def test_other_direction_key_is_rejected(backend):
    sender = TransportCipher(KEY, CHAINING_KEY, get_backend(backend))
    receiver = TransportCipher(CHAINING_KEY, CHAINING_KEY, get_backend(backend))
    with pytest.raises(DecryptError, match="bad record length tag"):
        receiver.open_length(sender.seal(b"x")[:RECORD_HEADER_SIZE])


def test_zero_length_record_is_rejected(backend):
    aead = get_backend(backend)
    receiver = TransportCipher(KEY, CHAINING_KEY, aead)
    header = aead.seal(KEY, 0, b"", b"\x00\x00")  # a peer that seals L = 0 itself
    with pytest.raises(DecryptError, match="zero-length record"):
        receiver.open_length(header)
    assert receiver.nonce == 0


def test_wrong_size_header_is_rejected(backend):
    sender, receiver = cipher_pair(backend)
    record = sender.seal(b"hello")
    with pytest.raises(DecryptError, match="bad record length tag"):
        receiver.open_length(record[: RECORD_HEADER_SIZE - 1])
    with pytest.raises(DecryptError):
        receiver.open_length(b"")


@pytest.mark.parametrize("length_field", [b"\x05", b"\x00\x00\x05"])
def test_header_must_hold_exactly_two_bytes(backend, length_field):
    # Only reachable by misuse (the caller reads exactly 18 bytes), but never guess a length.
    aead = get_backend(backend)
    receiver = TransportCipher(KEY, CHAINING_KEY, aead)
    with pytest.raises(DecryptError, match="bad record length tag"):
        receiver.open_length(aead.seal(KEY, 0, b"", length_field))
    assert receiver.nonce == 0


def test_receiver_call_order_is_enforced(backend):
    sender, receiver = cipher_pair(backend)
    record = sender.seal(b"hello")
    with pytest.raises(RuntimeError):
        receiver.open_body(record[RECORD_HEADER_SIZE:])
    assert receiver.open_length(record[:RECORD_HEADER_SIZE]) == 5
    with pytest.raises(RuntimeError):
        receiver.open_length(record[:RECORD_HEADER_SIZE])
    with pytest.raises(ValueError, match="21 bytes"):
        receiver.open_body(record[RECORD_HEADER_SIZE:-1])
    assert receiver.open_body(record[RECORD_HEADER_SIZE:]) == b"hello"


def test_repr_shows_no_key(backend):
    cipher = TransportCipher(KEY, CHAINING_KEY, get_backend(backend))
    text = repr(cipher)
    assert "nonce=0" in text and backend in text
    assert KEY.hex()[:8] not in text and CHAINING_KEY.hex()[:8] not in text


# --- public key encodings -------------------------------------------------------------------

PRIVATE = coincurve.PrivateKey(b"\x11" * 32)
COMPRESSED = "034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b704075871aa"
NOT_ON_CURVE_X = (5).to_bytes(32, "big")  # x^3 + 7 is not a square mod p for x = 5


def uncompressed():
    return PRIVATE.public_key.format(compressed=False)


def hybrid():
    raw = uncompressed()
    return bytes([6 + (raw[-1] & 1)]) + raw[1:]


def test_public_hex_and_bytes():
    assert crypto.public_hex(PRIVATE) == COMPRESSED
    assert crypto.public_key_bytes(PRIVATE) == bytes.fromhex(COMPRESSED)
    assert crypto.fingerprint(COMPRESSED) == COMPRESSED[:16]


@pytest.mark.parametrize(
    "text",
    [
        COMPRESSED,
        COMPRESSED.upper(),
        "0x" + COMPRESSED,
        "  " + COMPRESSED[:10] + " " + COMPRESSED[10:] + "\n",
        uncompressed().hex(),
        hybrid().hex(),
    ],
    ids=["compressed", "upper", "0x", "spaces", "uncompressed04", "hybrid"],
)
def test_normalize_public_key(text):
    assert crypto.normalize_public_key(text) == COMPRESSED


def test_hybrid_prefix_is_06_or_07():
    assert hybrid()[0] in (6, 7) and len(hybrid()) == 65


@pytest.mark.parametrize(
    "text, message",
    [
        ("not hex at all", "must be hex"),
        ("", "33 or 65 bytes"),
        (COMPRESSED[:-2], "33 or 65 bytes"),
        ("04" + COMPRESSED[2:], "not a valid"),
        ("02" + NOT_ON_CURVE_X.hex(), "not a valid"),
        ("05" + uncompressed().hex()[2:], "not a valid"),
    ],
    ids=["garbage", "empty", "short", "bad-prefix", "x-not-on-curve", "prefix-05"],
)
def test_normalize_public_key_rejects(text, message):
    with pytest.raises(KeyFormatError, match=message):
        crypto.normalize_public_key(text)


def test_parse_public_key_is_strict():
    assert crypto.parse_public_key(bytes.fromhex(COMPRESSED)).format().hex() == COMPRESSED
    for bad in (uncompressed(), hybrid(), b"\x04" + uncompressed()[1:33], b"\x02" + NOT_ON_CURVE_X,
                bytes.fromhex(COMPRESSED)[:-1], b""):
        with pytest.raises(KeyFormatError):
            crypto.parse_public_key(bad)


def test_ecdh_is_symmetric_and_bolt8():
    other = coincurve.PrivateKey(b"\x21" * 32)
    shared = crypto.ecdh(PRIVATE, crypto.public_key_bytes(other))
    assert shared == crypto.ecdh(other, crypto.public_key_bytes(PRIVATE))
    point = coincurve.PublicKey(crypto.public_key_bytes(other)).multiply(PRIVATE.secret)
    assert shared == crypto.sha256(point.format(compressed=True))


# --- key files --------------------------------------------------------------------------------


def test_write_private_key_is_0600_and_reads_back(tmp_path):
    path = tmp_path / "keys" / "agent.key"
    crypto.write_private_key(path, PRIVATE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.read_private_key(path).secret == PRIVATE.secret


def test_write_private_key_refuses_overwrite(tmp_path):
    path = tmp_path / "agent.key"
    crypto.write_private_key(path, PRIVATE)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        crypto.write_private_key(path, crypto.generate_private_key())
    assert crypto.read_private_key(path).secret == PRIVATE.secret


def test_read_private_key_refuses_0644(tmp_path):
    path = tmp_path / "agent.key"
    crypto.write_private_key(path, PRIVATE)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        crypto.read_private_key(path)
    with pytest.raises(KeyFileError, match="chmod 600"):
        crypto.load_or_create_private_key(path)


@pytest.mark.parametrize("content", ["", "zz" * 32, "11" * 31, "11" * 33, "00" * 32])
def test_read_private_key_rejects_malformed(tmp_path, content):
    path = tmp_path / "agent.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="64-digit hex"):
        crypto.read_private_key(path)


def test_read_private_key_missing(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        crypto.read_private_key(tmp_path / "nope.key")


def test_load_or_create_private_key(tmp_path):
    path = tmp_path / "server.key"
    created = crypto.load_or_create_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.load_or_create_private_key(path).secret == created.secret
