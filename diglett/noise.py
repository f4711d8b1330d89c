"""The Noise_XK_secp256k1_ChaChaPoly_SHA256 handshake of BOLT 8, as bytes in, bytes out.

This module owns the three acts (docs/protocol.md §5): the agent is the Initiator, the server
the Responder. It must not do I/O: no sockets, no gevent, no timeouts; the caller reads
exactly ACT_*_SIZE bytes under its own deadline and passes them in. After the last act each
side holds two TransportCipher objects from diglett.crypto.

Steps run once each, in order; calling one out of order is our bug and raises RuntimeError.
A peer's bad bytes raise HandshakeError with a HandshakeFault ``reason``; the object is then dead.
"""

import enum

import coincurve

from diglett.crypto import (
    PUBLIC_KEY_SIZE,
    TAG_SIZE,
    DecryptError,
    KeyFormatError,
    TransportCipher,
    ecdh,
    get_backend,
    hkdf2,
    parse_public_key,
    public_key_bytes,
    sha256,
)

PROTOCOL_NAME = b"Noise_XK_secp256k1_ChaChaPoly_SHA256"
HANDSHAKE_VERSION = 0  # first byte of every act; BOLT 8 defines only version 0
ACT_ONE_SIZE = 1 + PUBLIC_KEY_SIZE + TAG_SIZE  # version | e.pub | tag
ACT_TWO_SIZE = 1 + PUBLIC_KEY_SIZE + TAG_SIZE  # version | re.pub | tag
ACT_THREE_SIZE = 1 + PUBLIC_KEY_SIZE + TAG_SIZE + TAG_SIZE  # version | ENC(s.pub) | tag

# Step counters: each side moves START -> SENT/READ one -> DONE, or to FAILED.
_START, _MIDDLE, _DONE, _FAILED = range(4)


class HandshakeFault(enum.StrEnum):
    """What was wrong with the peer's handshake bytes; the values are metric labels."""

    SHORT_READ = "short read"
    ACT1_BAD_VERSION = "act1 bad version"
    ACT1_BAD_KEY = "act1 bad key"  # the ephemeral key is not a point
    ACT1_BAD_TAG = "act1 bad tag"  # made for another server key
    ACT2_BAD_VERSION = "act2 bad version"
    ACT2_BAD_KEY = "act2 bad key"
    ACT2_BAD_TAG = "act2 bad tag"  # on the agent: the server does not hold the pinned key
    ACT3_BAD_VERSION = "act3 bad version"
    ACT3_BAD_KEY = "act3 bad key"  # the encrypted static key fails its tag
    ACT3_BAD_RS = "act3 bad rs"  # it decrypts to a point that does not parse
    ACT3_BAD_TAG = "act3 bad tag"  # the final tag: the agent does not hold the key it claims


class HandshakeError(Exception):
    """The peer's handshake bytes were wrong; ``reason`` is the HandshakeFault."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = HandshakeFault(reason)


def _initial_hash(prologue):
    """(h, ck) after mixing the protocol name and the prologue, before any key."""
    h = sha256(PROTOCOL_NAME)  # the name is longer than 32 bytes, so it is hashed (Noise 5.2)
    return sha256(h + prologue), h


class _Handshake:
    """State shared by both roles: the handshake hash h, the chaining key ck, the AEAD."""

    def __init__(self, aead, ephemeral_key):
        self._aead = aead if aead is not None else get_backend()
        self._ephemeral = ephemeral_key  # test vectors only; None means a fresh key
        self._state = _START
        self._h = None
        self._ck = None
        self._result = None

    def _expect(self, state, step):
        if self._state != state:
            raise RuntimeError("%s called out of order (handshake state %d)" % (step, self._state))

    def _fail(self, reason):
        self._state = _FAILED
        self._ephemeral = None
        return HandshakeError(reason)

    def _mix_hash(self, data):
        self._h = sha256(self._h + data)

    def _mix_key(self, private_key, public_key33):
        """ck, temp_k = HKDF(ck, ECDH(private_key, public_key33)); returns temp_k."""
        self._ck, temp_key = hkdf2(self._ck, ecdh(private_key, public_key33))
        return temp_key

    def _encrypt_and_hash(self, key, nonce, plaintext):
        ciphertext = self._aead.seal(key, nonce, self._h, plaintext)
        self._mix_hash(ciphertext)
        return ciphertext

    def _decrypt_and_hash(self, key, nonce, ciphertext, reason):
        try:
            plaintext = self._aead.open(key, nonce, self._h, ciphertext)
        except DecryptError:
            raise self._fail(reason) from None
        self._mix_hash(ciphertext)
        return plaintext

    def _new_ephemeral(self):
        key = self._ephemeral if self._ephemeral is not None else coincurve.PrivateKey()
        self._ephemeral = key
        return key

    def _check_act(self, data, size, act):
        """Length and version checks, done before any DH; returns the act as bytes."""
        data = bytes(data)
        if len(data) != size:
            raise self._fail("short read")
        if data[0] != HANDSHAKE_VERSION:
            raise self._fail("%s bad version" % act)
        return data

    def _check_key(self, data, act):
        try:
            parse_public_key(data)
        except KeyFormatError:
            raise self._fail("%s bad key" % act) from None

    def _finish(self, initiator):
        """Split: BOLT 8's HKDF(ck, "") gives the initiator's send key first."""
        first, second = hkdf2(self._ck, b"")
        if not initiator:
            first, second = second, first
        self._result = (
            TransportCipher(first, self._ck, self._aead),
            TransportCipher(second, self._ck, self._aead),
        )
        self._state = _DONE
        self._ephemeral = None

    def _done(self):
        if self._state != _DONE:
            raise RuntimeError("handshake not complete")
        return self._result

    @property
    def send_cipher(self):
        """TransportCipher for records this side sends."""
        return self._done()[0]

    @property
    def recv_cipher(self):
        """TransportCipher for records this side receives."""
        return self._done()[1]

    @property
    def handshake_hash(self):
        """h after act three, identical on both sides: session ids bind to it (Noise 11.2).

        As in BOLT 8, the final act-three tag is not mixed into h.
        """
        self._done()
        return self._h


class Initiator(_Handshake):
    """The agent's side: knows the server's static key in advance (pinned), sends act 1 and 3."""

    def __init__(self, static_key, remote_static_pub, prologue, *, aead=None, ephemeral_key=None):
        super().__init__(aead, ephemeral_key)
        self._static = static_key
        self._remote_static = bytes(remote_static_pub)
        parse_public_key(self._remote_static)  # a bad pin is a configuration error: KeyFormatError
        self._h, self._ck = _initial_hash(bytes(prologue))
        self._mix_hash(self._remote_static)

    def act_one(self):
        """The 50 bytes to send first: version, ephemeral key, tag proving we know the pin."""
        self._expect(_START, "act_one")
        ephemeral = self._new_ephemeral()
        ephemeral_pub = public_key_bytes(ephemeral)
        self._mix_hash(ephemeral_pub)
        temp_key = self._mix_key(ephemeral, self._remote_static)
        tag = self._encrypt_and_hash(temp_key, 0, b"")
        self._state = _MIDDLE
        return b"\x00" + ephemeral_pub + tag

    def read_act_two(self, data):
        """Check the server's 50-byte act two; returns the 66-byte act three to send."""
        self._expect(_MIDDLE, "read_act_two")
        data = self._check_act(data, ACT_TWO_SIZE, "act2")
        remote_ephemeral = data[1 : 1 + PUBLIC_KEY_SIZE]
        self._check_key(remote_ephemeral, "act2")
        self._mix_hash(remote_ephemeral)
        temp_key = self._mix_key(self._ephemeral, remote_ephemeral)
        self._decrypt_and_hash(temp_key, 0, data[1 + PUBLIC_KEY_SIZE :], "act2 bad tag")
        # Act three: our static key, encrypted, then proof that we hold it (the se DH).
        encrypted_static = self._encrypt_and_hash(temp_key, 1, public_key_bytes(self._static))
        final_key = self._mix_key(self._static, remote_ephemeral)
        tag = self._aead.seal(final_key, 0, self._h, b"")
        self._finish(initiator=True)
        return b"\x00" + encrypted_static + tag


class Responder(_Handshake):
    """The server's side: one or more static keys (rotation), learns the agent's key in act 3."""

    def __init__(self, static_keys, prologue, *, aead=None, ephemeral_key=None):
        super().__init__(aead, ephemeral_key)
        if isinstance(static_keys, coincurve.PrivateKey):
            static_keys = [static_keys]
        if not static_keys:
            raise ValueError("Responder needs at least one static key")
        h, self._ck = _initial_hash(bytes(prologue))
        # One starting h per static key: the initiator mixed the key it pinned.
        self._candidates = [(key, sha256(h + public_key_bytes(key))) for key in static_keys]
        self._remote_ephemeral = None
        self._temp_key = None
        self.local_static = None
        self.remote_static = None

    def read_act_one(self, data):
        """Check the agent's 50-byte act one; returns the 50-byte act two to send.

        Each static key costs one ECDH and one tag check; the first that verifies wins.
        """
        self._expect(_START, "read_act_one")
        data = self._check_act(data, ACT_ONE_SIZE, "act1")
        remote_ephemeral = data[1 : 1 + PUBLIC_KEY_SIZE]
        self._check_key(remote_ephemeral, "act1")
        tag = data[1 + PUBLIC_KEY_SIZE :]
        start_ck = self._ck
        for key, start_h in self._candidates:
            self._h = sha256(start_h + remote_ephemeral)
            self._ck = start_ck
            temp_key = self._mix_key(key, remote_ephemeral)
            try:
                self._aead.open(temp_key, 0, self._h, tag)
            except DecryptError:
                continue
            self._mix_hash(tag)
            self.local_static = key
            break
        else:
            raise self._fail("act1 bad tag")
        self._candidates = None
        self._remote_ephemeral = remote_ephemeral
        ephemeral = self._new_ephemeral()
        ephemeral_pub = public_key_bytes(ephemeral)
        self._mix_hash(ephemeral_pub)
        self._temp_key = self._mix_key(ephemeral, remote_ephemeral)
        tag = self._encrypt_and_hash(self._temp_key, 0, b"")
        self._state = _MIDDLE
        return b"\x00" + ephemeral_pub + tag

    def read_act_three(self, data):
        """Check the agent's 66-byte act three; returns its verified 33-byte static key."""
        self._expect(_MIDDLE, "read_act_three")
        data = self._check_act(data, ACT_THREE_SIZE, "act3")
        encrypted_static = data[1 : 1 + PUBLIC_KEY_SIZE + TAG_SIZE]
        remote_static = self._decrypt_and_hash(self._temp_key, 1, encrypted_static, "act3 bad key")
        try:
            parse_public_key(remote_static)
        except KeyFormatError:
            raise self._fail("act3 bad rs") from None
        final_key = self._mix_key(self._ephemeral, remote_static)
        try:
            self._aead.open(final_key, 0, self._h, data[1 + PUBLIC_KEY_SIZE + TAG_SIZE :])
        except DecryptError:
            raise self._fail("act3 bad tag") from None
        self._temp_key = None
        self.remote_static = remote_static
        self._finish(initiator=False)
        return remote_static
