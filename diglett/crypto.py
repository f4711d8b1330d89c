"""Keys and ciphers: everything diglett does with secp256k1, HKDF and ChaCha20-Poly1305.

This module owns key encodings, key files, ECDH, HKDF and the record cipher. It must not
know about frames, sockets or configuration; diglett.noise builds the handshake on top of it.
Only coincurve, pycryptodome and (optionally) cryptography are imported here.
"""

import hashlib
import os
import stat
from pathlib import Path

import coincurve

PUBLIC_KEY_SIZE = 33  # compressed secp256k1 point: 02/03 prefix + 32-byte x
PUBLIC_KEY_HEX_LEN = 2 * PUBLIC_KEY_SIZE
PRIVATE_KEY_SIZE = 32


class KeyFormatError(ValueError):
    """A public or private key that is not a valid secp256k1 key in an accepted encoding."""


class KeyFileError(Exception):
    """A key file that cannot be used: missing, unreadable, malformed or too open."""


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
