"""diglett.proxyproto: PROXY protocol headers as bytes, checked against the spec's layout.

Known answers are written out by hand from haproxy's proxy-protocol.txt (section 2.2), round
trips and prefixes come from Hypothesis, and a reader driven by ``wanted`` must never take a
byte that belongs to the connection after the header.
"""

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diglett import proxyproto
from diglett.proxyproto import Header, HeaderError, encode_local, encode_v2, parse, wanted

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).parents[2]
SIG = "0d0a0d0a000d0a515549540a"

V4_HEADER = bytes.fromhex(SIG + "21" + "11" + "000c" + "7f000005" + "7f000001" + "1092" + "1f90")
V6_HEADER = bytes.fromhex(SIG + "21" + "21" + "0024" + "20010db8000000000000000000000001"
                          + "00000000000000000000000000000001" + "01bb" + "0050")
LOCAL_HEADER = bytes.fromhex(SIG + "20" + "00" + "0000")

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


# --- known answers ---------------------------------------------------------------------------


def test_ipv4_header_is_the_spec_layout():
    assert encode_v2(("127.0.0.5", 4242), ("127.0.0.1", 8080)) == V4_HEADER
    assert parse(V4_HEADER) == Header(28, ("127.0.0.5", 4242), ("127.0.0.1", 8080))


def test_ipv6_header_is_the_spec_layout():
    assert encode_v2(("2001:db8::1", 443), ("::1", 80)) == V6_HEADER
    assert parse(V6_HEADER) == Header(52, ("2001:db8::1", 443), ("::1", 80))


def test_local_header():
    assert encode_local() == LOCAL_HEADER
    assert parse(LOCAL_HEADER) == Header(16, None, None)


def test_local_with_addresses_ignores_them():
    header = bytearray(V4_HEADER)
    header[12] = 0x20  # LOCAL: "the receiver must ... use the real connection endpoints"
    assert parse(bytes(header)) == Header(28, None, None)


def test_mixed_families_are_written_as_ipv6():
    header = parse(encode_v2(("192.0.2.7", 1), ("2001:db8::2", 2)))
    assert header.source == ("::ffff:c000:207", 1)
    assert ipaddress.IPv6Address(header.source[0]).ipv4_mapped == ipaddress.IPv4Address("192.0.2.7")
    assert header.destination == ("2001:db8::2", 2)


def test_tlvs_after_the_addresses_are_part_of_the_header():
    tlv = bytes.fromhex("04" + "0003" + "616263")  # PP2_TYPE_NOOP with 3 bytes
    header = bytearray(V4_HEADER + tlv)
    header[14:16] = (12 + len(tlv)).to_bytes(2, "big")
    parsed = parse(bytes(header) + b"payload")
    assert parsed == Header(28 + len(tlv), ("127.0.0.5", 4242), ("127.0.0.1", 8080))


@pytest.mark.parametrize("family_transport", [0x01, 0x00, 0x31, 0x30])
def test_unspec_and_unix_carry_no_usable_address(family_transport):
    length = 216 if family_transport >> 4 == 3 else 0
    data = bytes.fromhex(SIG) + bytes([0x21, family_transport]) + length.to_bytes(2, "big")
    assert parse(data + bytes(length)) == Header(16 + length, None, None)


def test_trailing_bytes_are_not_part_of_the_header():
    assert parse(V4_HEADER + b"GET / HTTP/1.1\r\n").size == len(V4_HEADER)


# --- not enough bytes yet --------------------------------------------------------------------


@pytest.mark.parametrize("header", [V4_HEADER, V6_HEADER, LOCAL_HEADER,
                                    b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 80\r\n"])
def test_every_proper_prefix_needs_more(header):
    for end in range(len(header)):
        assert parse(header[:end]) is None, end
    assert parse(header).size == len(header)


# --- malformed headers -----------------------------------------------------------------------


@pytest.mark.parametrize("position", range(12))
def test_a_wrong_signature_byte_is_refused_at_once(position):
    data = bytearray(V4_HEADER[:position + 1])
    data[position] ^= 0x40
    with pytest.raises(HeaderError, match="signature"):
        parse(bytes(data))


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"SSH-2.0-x\r\n",
                                  b"proxy TCP4", b"\r\n\r\n\x01"])
def test_other_protocols_are_refused_at_their_first_bytes(data):
    with pytest.raises(HeaderError, match="signature"):
        parse(data)


@pytest.mark.parametrize("index, value, problem", [
    (12, 0x11, "version 1"),
    (12, 0x31, "version 3"),
    (12, 0x22, "unknown command 2"),
    (12, 0x2F, "unknown command 15"),
    (13, 0x41, "unknown address family 4"),
    (13, 0x13, "transport 3"),
    (13, 0x12, "transport 2 is not STREAM"),
    (13, 0x10, "transport 0 is not STREAM"),
    (15, 0x0B, "len 11 too short for address family 1"),
])
def test_bad_fields_name_the_value(index, value, problem):
    data = bytearray(V4_HEADER)
    data[index] = value
    with pytest.raises(HeaderError, match=problem):
        parse(bytes(data))


def test_ipv6_length_too_short():
    data = bytearray(V6_HEADER)
    data[15] = 12
    with pytest.raises(HeaderError, match="len 12 too short for address family 2"):
        parse(bytes(data))


def test_size_limit_is_checked_before_the_body_arrives():
    data = bytearray(V4_HEADER[:16])
    data[14:16] = (5000).to_bytes(2, "big")
    with pytest.raises(HeaderError, match="5016 bytes, more than the 4096"):
        parse(bytes(data))
    assert parse(bytes(data), max_size=6000) is None


@pytest.mark.parametrize("line, problem", [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 80\n", "CRLF"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1234\r\n", "SRC DST SPORT DPORT"),
    (b"PROXY TCP5 192.0.2.1 198.51.100.2 1234 80\r\n", "SRC DST SPORT DPORT"),
    (b"PROXY TCP4  192.0.2.1 198.51.100.2 1234 80\r\n", "SRC DST SPORT DPORT"),
    (b"PROXY TCP4 2001:db8::1 198.51.100.2 1234 80\r\n", "not TCP4 addresses"),
    (b"PROXY TCP6 192.0.2.1 2001:db8::1 1234 80\r\n", "not TCP6 addresses"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 80\r\n", "port '65536'"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 80\r\n", "port '-1'"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 \xd9\xa1\r\n", "not ASCII"),
    (b"PROXY TCP4 " + b"1" * 100, "longer than 107"),
    (b"PROXY TCP4 " + b"1" * 100 + b"\r\n", "within 107"),
])
def test_bad_version_1_lines(line, problem):
    with pytest.raises(HeaderError, match=problem):
        parse(line)


def test_version_1_lines():
    assert parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 80\r\nhello") == Header(
        43, ("192.0.2.1", 1234), ("198.51.100.2", 80))
    assert parse(b"PROXY TCP6 2001:db8::1 2001:DB8::2 65535 0\r\n") == Header(
        44, ("2001:db8::1", 65535), ("2001:db8::2", 0))
    assert parse(b"PROXY UNKNOWN\r\n") == Header(15, None, None)
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").source is None


def test_encode_refuses_what_it_cannot_write():
    with pytest.raises(HeaderError, match="not an IP address"):
        encode_v2(("example.com", 1), ("127.0.0.1", 2))
    with pytest.raises(HeaderError, match="port out of range"):
        encode_v2(("127.0.0.1", 65536), ("127.0.0.1", 2))


# --- properties ------------------------------------------------------------------------------


def _address_pairs():
    same = st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6))
    return st.tuples(same, ports, ports)


@settings(max_examples=300, deadline=None)
@given(_address_pairs(), st.binary(max_size=64))
def test_round_trip(addresses, tail):
    (src, dst), sport, dport = addresses
    header = encode_v2((src, sport), (dst, dport))
    assert len(header) == (28 if ":" not in src else 52)
    assert parse(header + tail) == Header(len(header), (src, sport), (dst, dport))


@settings(max_examples=200, deadline=None)
@given(_address_pairs(), st.binary(min_size=1, max_size=64), st.data())
def test_a_reader_driven_by_wanted_never_reads_past_the_header(addresses, tail, data):
    """Take at most ``wanted`` bytes per read, in reads of any size the network chooses."""
    (src, dst), sport, dport = addresses
    version_1 = data.draw(st.booleans())
    if version_1:
        family = "TCP6" if ":" in src else "TCP4"
        header = ("PROXY %s %s %s %d %d\r\n" % (family, src, dst, sport, dport)).encode()
    else:
        header = encode_v2((src, sport), (dst, dport))
    stream = header + tail
    taken = b""
    while True:
        found = parse(taken)
        if found is not None:
            break
        step = data.draw(st.integers(1, wanted(taken)))
        taken += stream[len(taken):len(taken) + step]
    assert taken == header and found.size == len(header)
    assert (found.source, found.destination) == ((src, sport), (dst, dport))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_header_error(data):
    try:
        found = parse(data)
    except HeaderError:
        return
    assert found is None or 0 < found.size <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([V4_HEADER, V6_HEADER, LOCAL_HEADER]), st.data())
def test_bit_flips_in_the_fixed_part_never_crash(header, data):
    position = data.draw(st.integers(0, 15))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(header)
    flipped[position] ^= 1 << bit
    try:
        found = parse(bytes(flipped))
    except HeaderError:
        return
    assert found is None or found.size <= len(flipped)


# --- the ip:port text of OPEN ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.one_of(ipv4, ipv6), ports)
def test_address_text_round_trip(host, port):
    text = proxyproto.format_address((host, port))
    assert proxyproto.parse_address(text) == (host, port)


def test_address_text():
    assert proxyproto.format_address(("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert proxyproto.parse_address("2001:db8::1:80") == ("2001:db8::1", 80)  # brackets optional
    assert proxyproto.parse_address("192.0.2.7:50000") == ("192.0.2.7", 50000)
    for bad in ("192.0.2.7", "192.0.2.7:", "host:80", "192.0.2.7:65536", ":80", 7, None):
        with pytest.raises(HeaderError):
            proxyproto.parse_address(bad)


def test_proxyproto_imports_no_io():
    code = ("import sys, diglett.proxyproto; bad = sorted(m for m in ('socket', '_socket', "
            "'gevent', 'ssl', 'peewee', 'blinker') if m in sys.modules); print(','.join(bad)); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, "imported: %s %s" % (result.stdout, result.stderr)


# --- the agent's header and the server's reader ----------------------------------------------


def test_agent_header_from_open_info():
    from diglett.agent import proxy_header

    backend = ("127.0.0.1", 8080)
    assert proxy_header({"remote": "127.0.0.5:4242", "local": "127.0.0.1:8080"}, backend) \
        == V4_HEADER
    assert parse(proxy_header({"remote": "[2001:db8::1]:443"}, ("::1", 80))) == \
        Header(52, ("2001:db8::1", 443), ("::1", 80))  # no local (older server): the backend
    assert proxy_header({}, backend) == LOCAL_HEADER  # no remote (older server): LOCAL
    with pytest.raises(HeaderError):
        proxy_header({"remote": "somewhere"}, backend)  # the agent falls back to LOCAL


def test_server_reads_exactly_the_header_from_a_socket():
    import socket

    from diglett.gateway.agent_session import read_proxy_header

    left, right = socket.socketpair()
    with left, right:
        left.sendall(V6_HEADER + b"stream bytes")
        assert read_proxy_header(right) == parse(V6_HEADER)
        assert right.recv(100) == b"stream bytes"
        left.sendall(b"PROXY UNKNOWN\r\n")
        left.shutdown(socket.SHUT_WR)
        assert read_proxy_header(right) == Header(15, None, None)
        with pytest.raises(ConnectionError, match="closed after 0 bytes"):
            read_proxy_header(right)


def test_trusted_sources():
    from diglett.config import networks
    from diglett.gateway.agent_session import trusted as _trusted

    trusted = networks("127.0.0.1, 10.0.0.0/8, 2001:db8::/32")
    assert _trusted(("127.0.0.1", 1), trusted)
    assert _trusted(("::ffff:10.1.2.3", 1, 0, 0), trusted)  # a dual-stack listener's IPv4 peer
    assert _trusted(("2001:db8::7", 1, 0, 0), trusted)
    assert not _trusted(("127.0.0.2", 1), trusted)
    assert not _trusted(("::1", 1, 0, 0), trusted)
