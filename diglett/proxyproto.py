"""The PROXY protocol (haproxy's proxy-protocol.txt): a header naming a connection's real ends.

Owns encoding a version 2 header (the agent writes one to its backend), parsing a version 2 or
version 1 header (the server reads one from a trusted proxy in front of a tunnel port), and
the ``ip:port`` text that OPEN frames carry. Bytes in, values out: no sockets, no gevent, and
only the standard library. "Not enough bytes yet" is a normal return (None), never an error.

Version 2 layout (all integers big-endian):

    signature (12)  0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a
    ver_cmd   (1)   high nibble version (2), low nibble command: 0 LOCAL, 1 PROXY
    fam       (1)   high nibble family: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX;
                    low nibble transport: 0 UNSPEC, 1 STREAM, 2 DGRAM
    len       (2)   bytes that follow: the address block, then optional TLVs (skipped here)
    addresses       INET: src(4) dst(4) sport(2) dport(2); INET6: src(16) dst(16) sport dport
"""

import ipaddress
import struct
from typing import NamedTuple

SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"  # the 12 bytes that open every version 2 header
SIGNATURE_V1 = b"PROXY "  # a version 1 header is one text line starting with this
V2_FIXED_SIZE = 16  # signature, ver_cmd, fam, len
V1_MAX_SIZE = 107  # the spec's bound on a version 1 line, CRLF included
V1_MIN_SIZE = 15  # "PROXY UNKNOWN\r\n": a reader may ask for this much without over-reading
MAX_HEADER_SIZE = 4096  # largest version 2 header accepted (TLVs included); the spec allows 64 KiB

VERSION = 2
CMD_LOCAL = 0x0  # the proxy's own connection (a health check): use the real endpoints
CMD_PROXY = 0x1  # relayed for a client: the addresses below are the client's and its target
FAMILY_UNSPEC = 0x0
FAMILY_INET = 0x1
FAMILY_INET6 = 0x2
FAMILY_UNIX = 0x3
TRANSPORT_UNSPEC = 0x0
TRANSPORT_STREAM = 0x1
TRANSPORT_DGRAM = 0x2

_ADDRESS_SIZES = {FAMILY_INET: 12, FAMILY_INET6: 36, FAMILY_UNIX: 216}  # minimum len per family
_INET = struct.Struct(">4s4sHH")
_INET6 = struct.Struct(">16s16sHH")
_FIXED = struct.Struct(">12sBBH")
_V1_FAMILIES = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}


class HeaderError(ValueError):
    """Bytes that are not a valid PROXY header; the message names the bad field and value."""


class Header(NamedTuple):
    """A parsed header: ``size`` bytes long; ``source``/``destination`` are (ip, port) tuples,
    or None when the header carries no usable address (LOCAL, UNSPEC, UNIX): the receiver
    then uses the connection's real endpoints, as the spec says."""

    size: int
    source: tuple | None
    destination: tuple | None


# --- encoding ------------------------------------------------------------------------------------


def encode_v2(source, destination):
    """A PROXY/STREAM header for a TCP connection from ``source`` to ``destination``.

    Both are (ip text, port). If one is IPv4 and the other IPv6, the IPv4 one is written as
    an IPv4-mapped IPv6 address, since a header has one family for both.
    """
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    ports = _port(source[1]), _port(destination[1])
    if src.version == 4:
        family, block = FAMILY_INET, _INET.pack(src.packed, dst.packed, *ports)
    else:
        family, block = FAMILY_INET6, _INET6.pack(src.packed, dst.packed, *ports)
    return _fixed(CMD_PROXY, family << 4 | TRANSPORT_STREAM, len(block)) + block


def encode_local():
    """A LOCAL header: no addresses; the receiver uses the connection's own endpoints."""
    return _fixed(CMD_LOCAL, FAMILY_UNSPEC << 4 | TRANSPORT_UNSPEC, 0)


def _fixed(command, family_transport, length):
    return _FIXED.pack(SIGNATURE_V2, VERSION << 4 | command, family_transport, length)


def _ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise HeaderError("not an IP address: %r" % (str(text)[:64],)) from None


def _as_v6(address):
    if address.version == 6:
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _port(value):
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise HeaderError("port out of range: %r" % (value,))
    return value


# --- parsing -------------------------------------------------------------------------------------


def parse(data, max_size=MAX_HEADER_SIZE):
    """The header at the start of ``data`` (version 2 or 1), None if more bytes are needed.

    Raises HeaderError as soon as the bytes cannot be the start of a header, so a peer
    that sends something else is refused at its first wrong byte, not after a timeout.
    Bytes after ``size`` belong to the connection, not to the header.
    """
    data = bytes(data)
    if data[:len(SIGNATURE_V2)] == SIGNATURE_V2[:len(data)]:
        return _parse_v2(data, max_size) if data else None
    if data[:len(SIGNATURE_V1)] == SIGNATURE_V1[:len(data)]:
        return _parse_v1(data)
    raise HeaderError("no PROXY protocol signature")


def wanted(data):
    """How many more bytes a reader may take without reading past the header's end.

    For version 2 that is the rest of the fixed part, then the rest of the header. A
    version 1 line's length shows only at its end, so past its shortest form: one byte.
    """
    data = bytes(data)
    if not data:  # either version: the shorter of the two shortest headers
        return V1_MIN_SIZE
    if data[:len(SIGNATURE_V2)] == SIGNATURE_V2[:len(data)]:
        if len(data) < V2_FIXED_SIZE:
            return V2_FIXED_SIZE - len(data)
        return max(1, V2_FIXED_SIZE + _FIXED.unpack_from(data)[3] - len(data))
    return max(1, V1_MIN_SIZE - len(data))


def _parse_v2(data, max_size):
    if len(data) < V2_FIXED_SIZE:
        return None
    _, version_command, family_transport, length = _FIXED.unpack_from(data)
    version, command = version_command >> 4, version_command & 0x0F
    family, transport = family_transport >> 4, family_transport & 0x0F
    if version != VERSION:
        raise HeaderError("version %d (only 2 is defined)" % version)
    if command not in (CMD_LOCAL, CMD_PROXY):
        raise HeaderError("unknown command %d" % command)
    if family > FAMILY_UNIX or transport > TRANSPORT_DGRAM:
        raise HeaderError("unknown address family %d or transport %d" % (family, transport))
    size = V2_FIXED_SIZE + length
    if size > max_size:
        raise HeaderError("header of %d bytes, more than the %d accepted" % (size, max_size))
    if length < _ADDRESS_SIZES.get(family, 0):
        raise HeaderError("len %d too short for address family %d" % (length, family))
    if len(data) < size:
        return None
    if command == CMD_LOCAL or family in (FAMILY_UNSPEC, FAMILY_UNIX):
        return Header(size, None, None)
    if transport != TRANSPORT_STREAM:
        raise HeaderError("transport %d is not STREAM (diglett relays TCP)" % transport)
    if family == FAMILY_INET:
        src, dst, sport, dport = _INET.unpack_from(data, V2_FIXED_SIZE)
        make = ipaddress.IPv4Address
    else:
        src, dst, sport, dport = _INET6.unpack_from(data, V2_FIXED_SIZE)
        make = ipaddress.IPv6Address
    return Header(size, (str(make(src)), sport), (str(make(dst)), dport))


def _parse_v1(data):
    end = data.find(b"\n")
    if end < 0:
        if len(data) >= V1_MAX_SIZE:
            raise HeaderError("version 1 line longer than %d bytes" % V1_MAX_SIZE)
        return None
    if end + 1 > V1_MAX_SIZE or data[end - 1:end] != b"\r":
        raise HeaderError("version 1 line not ended by CRLF within %d bytes" % V1_MAX_SIZE)
    try:
        fields = data[:end - 1].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise HeaderError("version 1 line is not ASCII") from None
    if fields[1:2] == ["UNKNOWN"]:  # the proxy cannot tell: the rest of the line is ignored
        return Header(end + 1, None, None)
    if len(fields) != 6 or fields[1] not in _V1_FAMILIES:
        raise HeaderError("version 1 line is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    make = _V1_FAMILIES[fields[1]]
    try:
        src, dst = str(make(fields[2])), str(make(fields[3]))
    except ValueError:
        raise HeaderError("version 1 addresses are not %s addresses" % fields[1]) from None
    return Header(end + 1, (src, _v1_port(fields[4])), (dst, _v1_port(fields[5])))


def _v1_port(text):
    if not (text.isdigit() and text.isascii()) or len(text) > 5 or int(text) > 0xFFFF:
        raise HeaderError("version 1 port %r is not 0-65535" % text[:8])
    return int(text)


# --- the ip:port text of OPEN frames -------------------------------------------------------------


def format_address(address):
    """(ip, port) -> "1.2.3.4:80" or "[2001:db8::1]:80"."""
    host, port = address[0], address[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def parse_address(text):
    """"ip:port" (IPv6 with or without brackets) -> (ip, port); HeaderError if it is not."""
    if not isinstance(text, str):
        raise HeaderError("address is not text: %r" % (text,))
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not port.isdigit() or not port.isascii() or int(port) > 0xFFFF:
        raise HeaderError("address %r is not ip:port" % text[:64])
    return str(_ip(host)), int(port)
