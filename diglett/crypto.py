"""Keys and ciphers: everything diglett does with secp256k1, HKDF and ChaCha20-Poly1305.

This module owns key encodings, key files, ECDH, HKDF and the record cipher. It must not
know about frames, sockets or configuration; diglett.noise builds the handshake on top of it.
Only coincurve, pycryptodome and (optionally) cryptography are imported here.
"""

import hashlib
import hmac
import os
import stat
import struct
from pathlib import Path

import coincurve
try:  # optional, ~8x faster AEAD (docs/benchmarks.md); the "fast" extra installs it
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
except ImportError:  # pragma: no cover - exercised only where cryptography is absent
    ChaCha20Poly1305 = None

    class InvalidTag(Exception):  # never raised: lets TAG_ERRORS name it regardless
        pass

AEAD_ENV = "DIGLETT_AEAD"  # force a record cipher backend: cryptography or pycryptodome
PUBLIC_KEY_SIZE = 33  # compressed secp256k1 point: 02/03 prefix + 32-byte x
PUBLIC_KEY_HEX_LEN = 2 * PUBLIC_KEY_SIZE
PRIVATE_KEY_SIZE = 32

KEY_SIZE = 32  # ChaCha20-Poly1305 key, HKDF output half
TAG_SIZE = 16  # Poly1305 tag appended to every ciphertext
MAX_RECORD_PLAINTEXT = 65535  # largest record body: the length prefix is a u16
RECORD_HEADER_SIZE = 2 + TAG_SIZE  # encrypted u16 length + its tag (BOLT 8 "lc")
KEY_ROTATION_NONCE = 1000  # BOLT 8: rotate a direction's key when its nonce reaches 1000


class KeyFormatError(ValueError):
    """A public or private key that is not a valid secp256k1 key in an accepted encoding."""


class KeyFileError(Exception):
    """A key file that cannot be used: missing, unreadable, malformed or too open."""


class DecryptError(Exception):
    """An AEAD tag did not verify, or a record header decrypted to an unusable length."""


def generate_private_key():
    return coincurve.PrivateKey()


def public_key_bytes(private_key):
    """The 33-byte compressed public key of ``private_key``."""
    return private_key.public_key.format(compressed=True)


def public_hex(private_key):
    return public_key_bytes(private_key).hex()


def parse_public_key(data):
    """Strict wire parsing: exactly 33 bytes, prefix 02/03, a point on the curve.

    Length and prefix are checked before coincurve sees the bytes, because coincurve also
    accepts uncompressed and hybrid encodings that are never valid on the wire.
    """
    if len(data) != PUBLIC_KEY_SIZE or data[0] not in (2, 3):
        raise KeyFormatError("public key must be 33 bytes starting with 02 or 03")
    try:
        return coincurve.PublicKey(bytes(data))
    except ValueError:
        raise KeyFormatError("public key is not a point on secp256k1") from None


def normalize_public_key(text):
    """Any hex encoding of a valid public key -> its 66-digit lowercase compressed hex.

    Accepts compressed (02/03), uncompressed (04) and hybrid (06/07) forms, so a grant typed
    in any of them matches the compressed key the handshake recovers.
    """
    cleaned = "".join(str(text).split()).lower()
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raise KeyFormatError(
            "public key must be hex (66 digits, e.g. from `diglett pubkey`), got %r" % text
        ) from None
    if len(raw) not in (33, 65):
        raise KeyFormatError(
            "public key must be 33 or 65 bytes (66 or 130 hex digits), got %d bytes" % len(raw)
        )
    try:
        point = coincurve.PublicKey(raw)
    except ValueError:
        raise KeyFormatError("%s... is not a valid secp256k1 public key" % cleaned[:16]) from None
    return point.format(compressed=True).hex()


def fingerprint(public_hex_key):
    """Short form of a public key for logs and tables: enough to tell keys apart."""
    return public_hex_key[:16]


def write_private_key(path, private_key):
    """Create ``path`` with mode 0600 holding the key as hex; never overwrite an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError("%s already exists; refusing to overwrite a key" % path) from None
    with os.fdopen(fd, "w") as handle:
        handle.write(private_key.secret.hex() + "\n")


def read_private_key(path):
    """Load a key written by write_private_key; refuse files others can read, as ssh does."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise KeyFileError("%s does not exist" % path) from None
    except OSError as exc:
        raise KeyFileError("cannot read %s: %s" % (path, exc.strerror)) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            "%s is readable by others (mode %o); run: chmod 600 %s"
            % (path, stat.S_IMODE(mode), path)
        )
    try:
        secret = bytes.fromhex(text.strip())
        if len(secret) != PRIVATE_KEY_SIZE:
            raise ValueError
        return coincurve.PrivateKey(secret)
    except ValueError:
        raise KeyFileError("%s does not hold a 64-digit hex secp256k1 private key" % path) from None


def load_or_create_private_key(path):
    """The server's static key: created with mode 0600 on first start."""
    try:
        return read_private_key(path)
    except KeyFileError:
        if Path(path).exists():
            raise
    key = generate_private_key()
    write_private_key(path, key)
    return key


def ecdh(private_key, public_key33):
    """SHA256 of the compressed shared point, as BOLT 8 and coincurve define ECDH."""
    return private_key.ecdh(bytes(public_key33))


def sha256(data):
    return hashlib.sha256(data).digest()


def hkdf2(salt, ikm):
    """RFC 5869 HKDF-SHA256 with empty info, 64 bytes split into two 32-byte keys.

    This is BOLT 8's ``HKDF(ck, ikm)``: the first key is the new chaining key.
    """
    prk = hmac.digest(salt, ikm, "sha256")
    first = hmac.digest(prk, b"\x01", "sha256")
    second = hmac.digest(prk, first + b"\x02", "sha256")
    return first, second


# BOLT 8 nonce: 32 zero bits then the 64-bit counter, little-endian (96 bits in all).
_NONCE = struct.Struct("<4xQ")
_AEAD_KEY_CACHE_SIZE = 16  # per backend object: handshake keys + both directions + rotations


class PycryptodomeAEAD:
    """ChaCha20-Poly1305 from pycryptodome: always available, ~20 us fixed cost per call.

    Imported only when chosen: pycryptodome loads cffi's C parser, ~10 MB per process that
    a process on the cryptography backend never needs.
    """

    name = "pycryptodome"

    def __init__(self):
        from Crypto.Cipher import ChaCha20_Poly1305

        self._new = ChaCha20_Poly1305.new

    def seal(self, key, nonce, ad, plaintext):
        cipher = self._new(key=key, nonce=_NONCE.pack(nonce))
        if ad:
            cipher.update(ad)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return ciphertext + tag

    def open(self, key, nonce, ad, ciphertext_with_tag):
        return self.keyed(key)[1](_NONCE.pack(nonce), ciphertext_with_tag, ad)

    def keyed(self, key):
        """(encrypt, decrypt) for one key, called as cryptography's are: (nonce12, data, ad)."""
        new = self._new

        def encrypt(nonce, plaintext, ad):
            cipher = new(key=key, nonce=nonce)
            if ad:
                cipher.update(ad)
            ciphertext, tag = cipher.encrypt_and_digest(plaintext)
            return ciphertext + tag

        def decrypt(nonce, ciphertext_with_tag, ad):
            if len(ciphertext_with_tag) < TAG_SIZE:
                raise DecryptError("ciphertext shorter than its tag")
            cipher = new(key=key, nonce=nonce)
            if ad:
                cipher.update(ad)
            view = memoryview(ciphertext_with_tag)  # slices without copying the body
            try:
                return cipher.decrypt_and_verify(view[:-TAG_SIZE], view[-TAG_SIZE:])
            except ValueError:
                raise DecryptError("tag mismatch") from None

        return encrypt, decrypt


class CryptographyAEAD:
    """ChaCha20-Poly1305 from OpenSSL through ``cryptography``: ~1 us per call.

    Building the AEAD object costs about as much as one small encryption, so objects are
    cached per key. Keys change only at handshake and every 500 records, so a small cache
    suffices; give each connection its own backend object (get_backend() returns a new
    one) so connections do not evict each other's keys.
    """

    name = "cryptography"

    def __init__(self):
        self._ciphers = {}

    def _cipher(self, key):
        cipher = self._ciphers.get(key)
        if cipher is None:
            if len(self._ciphers) >= _AEAD_KEY_CACHE_SIZE:
                del self._ciphers[next(iter(self._ciphers))]  # oldest first
            cipher = self._ciphers[key] = ChaCha20Poly1305(key)
        return cipher

    def seal(self, key, nonce, ad, plaintext):
        return self._cipher(key).encrypt(_NONCE.pack(nonce), plaintext, ad)

    def open(self, key, nonce, ad, ciphertext_with_tag):
        try:
            return self._cipher(key).decrypt(_NONCE.pack(nonce), ciphertext_with_tag, ad)
        except InvalidTag:
            raise DecryptError("tag mismatch") from None

    @staticmethod
    def keyed(key):
        """(encrypt, decrypt) for one key: the C methods themselves, no Python frame between
        a record and OpenSSL (a decrypt failure raises InvalidTag: see TAG_ERRORS)."""
        cipher = ChaCha20Poly1305(key)
        return cipher.encrypt, cipher.decrypt


_BACKENDS = {"cryptography": CryptographyAEAD, "pycryptodome": PycryptodomeAEAD}
TAG_ERRORS = (DecryptError, InvalidTag)  # what a keyed() decrypt raises on a bad tag


def available_backends():
    """Names of the AEAD backends importable here, fastest first."""
    names = ["pycryptodome"]
    if ChaCha20Poly1305 is not None:
        names.insert(0, "cryptography")
    return names


def get_backend(name="auto"):
    """A new AEAD backend object; "auto" is $DIGLETT_AEAD if set, else the fastest one."""
    available = available_backends()
    if name == "auto":
        name = os.environ.get(AEAD_ENV) or available[0]
    if name not in _BACKENDS:
        raise ValueError(
            "unknown AEAD backend %r; choose one of: auto, %s" % (name, ", ".join(_BACKENDS))
        )
    if name not in available:
        raise ValueError(
            "AEAD backend %r is not available: install it with pip install 'diglett[fast]'"
            % name
        )
    return _BACKENDS[name]()


class TransportCipher:
    """One direction of the BOLT 8 transport: a key, its counter nonce, its chaining key.

    A record is ``ENC(k, n, "", u16be(L)) || ENC(k, n+1, "", plaintext)``; the nonce then
    advances by 2 and, on reaching 1000, the key rotates: ``ck, k = HKDF(ck, k); n = 0``.
    The receiver calls open_length on 18 bytes, then open_body on exactly L+16 bytes.
    Any failure leaves the state unchanged (the Noise rule), though the caller must close
    the connection anyway. Only one greenlet may use an instance: nonce order is wire order.
    """

    def __init__(self, key, chaining_key, aead):
        self._chaining_key = chaining_key
        self._aead = aead
        self._pending_length = None  # set by open_length, consumed by open_body
        self.nonce = 0
        self.rotations = 0
        self._set_key(key)

    def _set_key(self, key):
        # The record path calls the backend's per-key functions directly: per record that
        # saves the backend's method, its key-cache lookup and their frames, twice.
        self._key = key
        self._encrypt, self._decrypt = self._aead.keyed(key)

    @property
    def aead_name(self):
        return self._aead.name

    def __repr__(self):
        return "<TransportCipher %s nonce=%d rotations=%d>" % (
            self._aead.name,
            self.nonce,
            self.rotations,
        )

    def seal(self, plaintext):
        """One whole record (18 + L + 16 bytes) carrying ``plaintext`` (1..65535 bytes)."""
        return b"".join(self.seal_parts(plaintext))

    def seal_parts(self, plaintext):
        """The record as (header, body), so a writer can send both without joining them."""
        length = len(plaintext)
        if not 0 < length <= MAX_RECORD_PLAINTEXT:
            raise ValueError(
                "record plaintext must be 1..%d bytes, got %d" % (MAX_RECORD_PLAINTEXT, length)
            )
        nonce = self.nonce
        header = self._encrypt(_NONCE.pack(nonce), length.to_bytes(2, "big"), None)
        body = self._encrypt(_NONCE.pack(nonce + 1), plaintext, None)
        nonce += 2
        if nonce >= KEY_ROTATION_NONCE:
            self._advance(nonce)
        else:
            self.nonce = nonce
        return header, body

    def open_length(self, header):
        """Decrypt an 18-byte record header; returns L, the body plaintext length.

        Raises DecryptError("bad record length tag") on a bad tag and DecryptError
        ("zero-length record") for L == 0, which no honest sender produces.
        """
        if self._pending_length is not None:
            raise RuntimeError("open_length called twice without open_body")
        try:
            plain = self._decrypt(_NONCE.pack(self.nonce), header, None)
        except TAG_ERRORS:
            raise DecryptError("bad record length tag") from None
        if len(plain) != 2:  # only a header of the wrong size can decrypt to this
            raise DecryptError("bad record length tag")
        length = int.from_bytes(plain, "big")
        if length == 0:
            raise DecryptError("zero-length record")
        self._pending_length = length
        self.nonce += 1
        return length

    def open_body(self, body):
        """Decrypt the L+16 bytes that follow a header; returns the L-byte plaintext."""
        length = self._pending_length
        if length is None:
            raise RuntimeError("open_body called before open_length")
        if len(body) != length + TAG_SIZE:
            raise ValueError(
                "record body must be %d bytes, got %d" % (length + TAG_SIZE, len(body))
            )
        try:
            plaintext = self._decrypt(_NONCE.pack(self.nonce), body, None)
        except TAG_ERRORS:
            raise DecryptError("bad record tag") from None
        self._pending_length = None
        nonce = self.nonce + 1
        if nonce >= KEY_ROTATION_NONCE:
            self._advance(nonce)
        else:
            self.nonce = nonce
        return plaintext

    def _advance(self, nonce):
        if nonce >= KEY_ROTATION_NONCE:
            self._chaining_key, key = hkdf2(self._chaining_key, self._key)
            self._set_key(key)
            self.rotations += 1
            nonce = 0
        self.nonce = nonce
