"""Enrolment codes: the one line `diglett-admin invite` prints and `diglett enroll` reads.

A code carries what a fresh agent needs to join: the gateway address(es), the server's public
key (pinned before the first byte goes out), the name it is invited to, and a one-time secret
that it proves inside the Noise session (docs/protocol.md §9.5 gives the byte layout and a test
vector). The checksum catches a code damaged in copy and paste before any connection is made;
a code tampered with on purpose still fails: another server key fails the handshake, another
secret or name is refused by the server. This module is data only: no sockets, no files.
"""

import base64
import hashlib
import struct
from dataclasses import dataclass

from diglett import crypto, names
from diglett.reach import gateway_url

PREFIX = "dg1-"  # the text form: PREFIX + base64url(body + checksum), no padding
VERSION = 1
INVITE_ID_SIZE = 8  # bytes: names the invite row (hex in the registry)
SECRET_SIZE = 16  # bytes: 128 random bits; the registry stores only their SHA-256
CHECKSUM_SIZE = 4  # bytes of SHA-256 over everything before them
MAX_GATEWAYS_LEN = 1024  # bytes of the comma-separated gateway list
MAX_CODE_LEN = 2048  # characters of a code's text form


class InvalidCode(ValueError):
    """A code that is not one `diglett-admin invite` printed; the message says what is off."""


@dataclass(frozen=True)
class Invite:
    gateways: str  # the agent's --gateway text: host:port, tls://, wss://, comma-separated
    server_key: str  # 66 hex digits
    subdomain: str
    invite_id: str  # 16 hex digits
    secret: str  # 32 hex digits; never logged

    def __repr__(self):  # the secret stays out of logs and tracebacks
        return "Invite(%s, %s, %s, id=%s)" % (self.subdomain, self.gateways,
                                              crypto.fingerprint(self.server_key), self.invite_id)


def encode(invite):
    name = invite.subdomain.encode()
    gateways = invite.gateways.encode()
    if len(gateways) > MAX_GATEWAYS_LEN:
        raise InvalidCode("at most %d bytes of gateway addresses" % MAX_GATEWAYS_LEN)
    body = (struct.pack("!B", VERSION) + bytes.fromhex(invite.server_key)
            + bytes.fromhex(invite.invite_id) + bytes.fromhex(invite.secret)
            + struct.pack("!B", len(name)) + name + struct.pack("!H", len(gateways)) + gateways)
    body += hashlib.sha256(body).digest()[:CHECKSUM_SIZE]
    return PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode(text):
    """The Invite of a code's text; InvalidCode says why not."""
    text = text.strip() if isinstance(text, str) else ""
    if not text.startswith(PREFIX) or len(text) > MAX_CODE_LEN:
        raise InvalidCode("an enrolment code starts with %r (copy the whole line "
                          "`diglett-admin invite` printed)" % PREFIX)
    packed = text[len(PREFIX):]
    try:
        data = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
    except ValueError:
        raise InvalidCode("the code is damaged: not base64url") from None
    body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
    if len(data) <= CHECKSUM_SIZE or hashlib.sha256(body).digest()[:CHECKSUM_SIZE] != checksum:
        raise InvalidCode("the code is damaged (its checksum does not match); copy it again")
    return _parse(body)


def _parse(body):
    fixed = 1 + 33 + INVITE_ID_SIZE + SECRET_SIZE
    if len(body) < fixed + 1 or body[0] != VERSION:
        raise InvalidCode("code version %d is not known here; upgrade diglett"
                          % (body[0] if body else 0))
    key, rest = body[1:34], body[34:]
    invite_id, secret = rest[:INVITE_ID_SIZE], rest[INVITE_ID_SIZE:INVITE_ID_SIZE + SECRET_SIZE]
    rest = rest[INVITE_ID_SIZE + SECRET_SIZE:]
    name_len = rest[0]
    name, rest = rest[1:1 + name_len], rest[1 + name_len:]
    if len(name) != name_len or len(rest) < 2:
        raise InvalidCode("the code is truncated")
    (gateways_len,) = struct.unpack("!H", rest[:2])
    gateways = rest[2:]
    if len(gateways) != gateways_len or not gateways:
        raise InvalidCode("the code's gateway list is truncated or empty")
    try:
        return Invite(gateways=_check_gateways(gateways.decode("ascii")),
                      server_key=crypto.normalize_public_key(key.hex()),
                      subdomain=names.validate_subdomain(name.decode("ascii")),
                      invite_id=invite_id.hex(), secret=secret.hex())
    except (UnicodeDecodeError, crypto.KeyFormatError, names.InvalidName) as exc:
        raise InvalidCode("the code holds a bad value: %s" % exc) from None


def gateways_of(text):
    """[GatewayUrl] of a code's gateways text, in any form the agent's --gateway takes
    (``host:port``, ``tls://host``, ``wss://host/path``), comma-separated with no empty
    entry; ValueError (gateway_url.GatewayUrlError) says which entry is bad."""
    return [gateway_url.parse(entry) for entry in text.split(",")]


def gateway_entry(text):
    """One gateway for a new code, as given to `invite --gateway` or the API; ValueError says
    why agents could not dial it (a bad form, a list, or an address that means "every
    address" rather than one to dial)."""
    if not isinstance(text, str) or "," in text:
        raise ValueError("one gateway per entry, got %r" % (text,))
    if "://" not in text and text.count(":") > 1 and not text.strip().startswith("["):
        host, _, port = text.strip().rpartition(":")  # a listener's own "::1:20000" form
        text = "[%s]:%s" % (host, port)
    gateway = gateway_url.parse(text)
    if gateway.host in ("0.0.0.0", "::"):
        raise ValueError("%s listens on every address; give the address agents dial" % text)
    return str(gateway) if gateway.scheme == "tcp" else text.strip()


def _check_gateways(text):
    try:
        gateways_of(text)
    except ValueError as exc:
        raise InvalidCode("the code holds a bad value: %s" % exc) from None
    return text
