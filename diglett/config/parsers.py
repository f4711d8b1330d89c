"""Value parsers for config files: the text of one key -> its value, or ValueError.

This module owns what each kind of value may look like (addresses, durations, sizes, networks,
names) and the words of the complaint: a ValueError says what is wrong and how to fix it, and
the loader prefixes it with the file, the line and the key. It must not know about sections,
files or defaults (diglett.config.schema and diglett.config.loader do), and it must not touch
the network: names are checked as text, never resolved.
"""

import ipaddress
import math
import os
import re
import socket
from pathlib import Path

from diglett import names

MAX_PORT = 65535
MAX_STARTUPS_RATE = 100  # the RATE of START:RATE:FULL is a percentage
GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")  # [server] gateway_id
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def string(text):
    return text


def string_list(text):
    """Comma-separated (or one per line) -> tuple; blanks dropped, so a trailing comma is fine."""
    return tuple(item.strip() for item in re.split(r"[,\n]", text) if item.strip())


def boolean(text):
    words = {"yes": True, "true": True, "on": True, "1": True}
    words.update({"no": False, "false": False, "off": False, "0": False})
    if text.lower() not in words:
        raise ValueError("must be yes or no")
    return words[text.lower()]


def path(text):
    """A file path; the loader resolves a relative one against the config file's folder."""
    if not text:
        raise ValueError("is empty (write a file path)")
    return Path(text).expanduser()


def database(text):
    """A URL (sqlite:///..., postgresql://...) kept as written, or a SQLite file path."""
    if "://" in text or text == ":memory:":
        return text
    return path(text)


def gateway_id(text):
    """A gateway's name in a shared registry; empty means this machine's host name."""
    if not text:
        return host_gateway_id()
    if not GATEWAY_ID_RE.fullmatch(text):
        raise ValueError("must be 1-63 letters, digits, '-', '_' or '.' (e.g. gw1 or "
                         "gw1.example.com)")
    return text


def host_gateway_id():
    """The host name, made a valid gateway_id (other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63]
    return name or "localhost"


def choice(*names):
    def parse(text):
        if text.lower() not in names:
            raise ValueError("must be one of %s" % ", ".join(names))
        return text.lower()

    return parse


def integer(low, high=None):
    bounds = "at least %d" % low if high is None else "from %d to %d" % (low, high)

    def parse(text):
        if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) <= (high or int(text)):
            raise ValueError("must be a whole number %s" % bounds)
        return int(text)

    return parse


MAX_WORKERS = 256  # [server] workers: more processes than this is a typo, not a machine


def workers(text):
    """Worker processes; 0 means one per core this process may run on."""
    count = integer(0, MAX_WORKERS)(text)
    return count or cores()


def cores():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def seconds(positive=True):
    """Seconds as int or float; ``positive=False`` also allows 0 (which the key's doc explains)."""
    bounds = "more than 0" if positive else "0 or more"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number of seconds, e.g. 10 or 2.5") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError("must be %s seconds" % bounds)
        return int(value) if re.fullmatch(r"[0-9]+", text) else value

    return parse


def size(low, high=None):
    """Bytes, or a whole number with K, M or G (also KiB, MiB, GiB): all powers of 1024."""
    bounds = "at least %s" % format_size(low)
    if high is not None:
        bounds = "from %s to %s" % (format_size(low), format_size(high))

    def parse(text):
        match = re.fullmatch(r"([0-9]+)\s*(?:([kmg])(?:ib)?)?", text, re.IGNORECASE)
        if not match:
            raise ValueError("write bytes or a number with K, M or G (KiB-based), e.g. 256K")
        value = int(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]
        if value < low or (high is not None and value > high):
            raise ValueError("must be %s" % bounds)
        return value

    return parse


def format_size(value):
    """The shortest exact K/M/G spelling of ``value`` bytes, as a config file would write it."""
    for suffix, unit in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value and value % unit == 0:
            return "%d%s" % (value // unit, suffix)
    return str(value)


def ip_address(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("must be an IP address such as 127.0.0.1 or ::1, not a name") from None


def networks(text):
    """Comma-separated IP addresses or CIDR networks -> a tuple of ipaddress networks."""
    found = []
    for item in string_list(text):
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("%s is not an IP address or network such as 127.0.0.1 or "
                             "10.0.0.0/8 (names are not allowed)" % item) from None
    return tuple(found)


def dns_name(text):
    """A domain by diglett.names' rules (the ones the server applies to tunnel names)."""
    name = names.validate_domain(text)  # InvalidName is a ValueError naming the bad label
    if _is_ip(name):
        raise ValueError("must be a DNS name, not an IP address (write e.g. tunnel.example.com)")
    return name


def host_port(text):
    """HOST:PORT -> (host, port); an IPv6 host goes in brackets; port 0 means any free port."""
    usage = "write HOST:PORT, e.g. 0.0.0.0:20000"
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("missing :PORT (%s)" % usage)
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets (write e.g. [::]:20000)")
    if not host or not (_is_ip(host) if bracketed else _is_ip(host) or _is_dns_name(host)):
        raise ValueError("missing or bad host (%s)" % usage)
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > MAX_PORT:
        raise ValueError("port must be 0-%d (%s)" % (MAX_PORT, usage))
    return host, int(port)


def optional(parse):
    """``parse``, except that empty text means None (the feature is off)."""
    def parse_optional(text):
        return parse(text) if text else None
    return parse_optional


def url_path(text):
    """An absolute URL path such as /diglett."""
    if not text.startswith("/") or any(c in text for c in " ?#"):
        raise ValueError("must be a path starting with /, e.g. /diglett")
    return text


def port_range(text):
    """0 -> None (a random free port per tunnel), A-B -> (A, B)."""
    if text == "0":
        return None
    match = re.fullmatch(r"([0-9]{1,5})\s*-\s*([0-9]{1,5})", text)
    if match and 1 <= int(match[1]) <= int(match[2]) <= MAX_PORT:
        return int(match[1]), int(match[2])
    raise ValueError(
        "write 0 (a random free port per tunnel) or a range A-B with 1 <= A <= B <= %d, "
        "e.g. 30000-30999" % MAX_PORT
    )


def startups(text):
    """START:RATE:FULL as OpenSSH's MaxStartups -> (start, rate, full)."""
    parts = text.split(":")
    if len(parts) == 3 and all(re.fullmatch(r"[0-9]+", part) for part in parts):
        start, rate, full = map(int, parts)
        if start <= full and full >= 1 and rate <= MAX_STARTUPS_RATE:
            return start, rate, full
    raise ValueError(
        "write START:RATE:FULL with START <= FULL, FULL at least 1 and RATE a percentage "
        "0-100, e.g. 16:30:64"
    )


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_dns_name(text):
    try:
        names.validate_domain(text)
    except names.InvalidName:
        return False
    return True
