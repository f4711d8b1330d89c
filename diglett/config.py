"""Configuration files: the server's INI file and the agent's, read once into frozen values.

This module owns the table of every section and key (parser, default, one-line doc), reading a
file with configparser (interpolation off, so ``%`` in secrets and URLs is literal), the line
numbers that messages point at, and ConfigError. Hook modules add their own sections with
register_section(). Loading has no side effects: it must not create the key file or the
database, open sockets, or configure logging; the server does that with the values it gets here.
"""

import configparser
import dataclasses
import difflib
import io
import ipaddress
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from diglett import names

DOCS = "docs/configuration.md"  # where messages send the reader for the list of keys
MASK = "***"  # printed instead of a secret's value
SERVER_SECTION = "server"
AGENT_SECTION = "agent"
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_PORT = 65535
MIN_STREAM_WINDOW = 16 * 1024  # below this every stream stalls on round trips
MAX_STREAM_WINDOW = 16 * 1024 * 1024  # bound on what one stream may buffer at the peer
MAX_STARTUPS_RATE = 100  # the RATE of START:RATE:FULL is a percentage
GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")  # [server] gateway_id
MIN_GATEWAY_STALE_AFTER = 3  # seconds: gateways refresh their row at a third of it, at least 1 s
_NO_DEFAULT_SECTION = "\0"  # turns off configparser's [DEFAULT] merging: [DEFAULT] is unknown
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class ConfigError(Exception):
    """A config file that cannot be used. str() names the file, the line and how to fix it."""

    def __init__(self, path, line, message):
        self.path = path
        self.line = line
        where = "%s:%d" % (path, line) if line else str(path)
        super().__init__("%s: %s" % (where, message))


@dataclass(frozen=True)
class Key:
    """One key: how to parse its text, its default as written in a file, one line of doc.

    ``default=None`` means no default: the key is left out of the result unless the file sets
    it. A ``secret`` value is masked in reprs and in error messages.
    """

    parse: Callable[[str], Any]
    default: str | None
    doc: str
    secret: bool = False


@dataclass(frozen=True)
class Section:
    """The keys of one section, and an optional check across them.

    ``check(values)`` returns None, or ``(keys, problem)``: the message points at the first of
    ``keys`` set in the file (else at the section header), so write ``problem`` without
    assuming which key that is.
    """

    keys: Mapping[str, Key]
    check: Callable[[Mapping[str, Any]], tuple | None] | None = None


class SectionValues(Mapping):
    """The parsed values of one section: a read-only mapping whose repr masks secrets."""

    def __init__(self, values, secrets=()):
        self._values = dict(values)
        self._secrets = frozenset(secrets)

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return "{%s}" % ", ".join(
            "%r: %s" % (key, _shown(value, key in self._secrets))
            for key, value in self._values.items()
        )


def _shown(value, secret):
    """repr(value) for reprs, with secrets and URL passwords (a database URL's) masked."""
    if secret and value:
        return MASK
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            netloc = parts.netloc.replace(":%s@" % parts.password, ":%s@" % MASK, 1)
            return repr(parts._replace(netloc=netloc).geturl())
    return repr(value)


# --- parsers: text -> value, or ValueError("what is wrong (how to fix it)") ---------------------


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


# --- the table -------------------------------------------------------------------------------


def _check_server(values):
    """Rules across [server] keys; returns (keys, problem) or None."""
    if values["dead_after"] <= values["ping_interval"]:
        return ("dead_after", "ping_interval"), (
            "dead_after (%s) must be more than ping_interval (%s) (make dead_after about "
            "3 x ping_interval)" % (values["dead_after"], values["ping_interval"])
        )
    if values["gateway_stale_after"] < MIN_GATEWAY_STALE_AFTER:
        return ("gateway_stale_after",), (
            "gateway_stale_after must be at least %d seconds (keep the default 30 unless a "
            "test needs it short)" % MIN_GATEWAY_STALE_AFTER)
    if values["memory_budget"] < values["stream_window"]:
        return ("memory_budget", "stream_window"), (
            "memory_budget (%s) must be at least stream_window (%s) (raise memory_budget)"
            % (format_size(values["memory_budget"]), format_size(values["stream_window"]))
        )
    return None


SERVER = Section(
    {
        "listen": Key(host_port, "0.0.0.0:20000", "HOST:PORT agents dial; IPv6 as [::]:20000"),
        "http": Key(host_port, "127.0.0.1:20080", "HOST:PORT of the HTTP API (/info, /healthz)"),
        "domain": Key(dns_name, "example.com", "public parent domain: tunnel foo is foo.DOMAIN"),
        "bind": Key(ip_address, "127.0.0.1", "IP address the per-agent tunnel listeners bind"),
        "ports": Key(port_range, "0", "tunnel ports: 0 = a random free port, or a range A-B"),
        "proxy_trusted": Key(networks, "", "IPs/CIDRs whose connections to a tunnel port start "
                             "with a PROXY protocol header naming the real client"),
        "key": Key(path, "/var/lib/diglett/server.key", "server static key file (made 0600)"),
        "database": Key(database, "/var/lib/diglett/registry.db", "SQLite path or database URL"),
        "gateway_id": Key(gateway_id, "", "this server's name in a shared registry (empty: the "
                          "host name)"),
        "gateway_stale_after": Key(seconds(), "30", "seconds after which another gateway that "
                                   "stopped refreshing its row has its sessions ended"),
        "handshake_timeout": Key(seconds(), "10", "seconds from accept to the agent's CONFIG"),
        "ping_interval": Key(seconds(), "10", "seconds between pings on an idle session"),
        "dead_after": Key(seconds(), "30", "seconds of silence before a session is dead"),
        "max_streams": Key(integer(1), "16384", "open streams per agent"),
        "stream_window": Key(
            size(MIN_STREAM_WINDOW, MAX_STREAM_WINDOW), "2M", "per-stream credit window"
        ),
        "open_rate": Key(integer(1), "1000", "new streams per second per agent (then queued)"),
        "open_burst": Key(integer(1), "2000", "new streams an agent may open at once"),
        "max_startups": Key(startups, "16:30:64", "handshakes in progress, START:RATE:FULL"),
        "per_source_startups": Key(integer(1), "8", "handshakes in progress per source address"),
        "penalty_max": Key(seconds(False), "30", "cap in seconds of an auth-failure penalty"),
        "memory_budget": Key(size(1), "256M", "buffered tunnel bytes before streams are refused"),
        "ping_limit": Key(integer(0), "1000", "PINGs an agent may send per minute; more "
                          "ends its session (0 = no limit)"),
        "flood_limit": Key(integer(0), "20000", "frames per second that move no stream "
                           "forward (for a closed stream, PONG) before a session ends "
                           "(0 = no limit)"),
        "write_stall_timeout": Key(seconds(), "30", "seconds without send progress: close"),
        "stream_idle_timeout": Key(seconds(False), "900", "idle seconds before a stream closes"),
        "drain_timeout": Key(seconds(False), "30", "seconds open streams may run on after "
                             "SIGTERM before they are reset"),
        "shutdown_timeout": Key(seconds(False), "10", "seconds for sessions to end and hooks "
                                "to finish after the drain"),
        "log_level": Key(choice(*LOG_LEVELS), "info", "debug, info, warning or error"),
        "log_format": Key(choice("text", "json"), "text", "text (key=value pairs) or json"),
        "audit_retention": Key(seconds(), "7776000", "seconds audit entries are kept (90 days)"),
        "token": Key(string, "", "bearer token for /metrics, /api/tunnels and / when http is "
                     "not loopback (empty: only /info and /healthz are served there)",
                     secret=True),
    },
    check=_check_server,
)

# Every section a server config may hold. A name ending in ":" is a prefix: "hook:" would own
# every [hook:NAME] section. Later sections are added here, or by register_section().
SECTIONS = {SERVER_SECTION: SERVER}

AGENT = Section(
    {
        "gateway": Key(string, None, "HOST:PORT of the server's listen address"),
        "name": Key(string, None, "the subdomain this agent asks for"),
        "key-file": Key(path, None, "the agent's private key file"),
        "server-key": Key(string, None, "the server's public key (hex) to pin"),
        "info-url": Key(string, None, "URL of the server's /info, to learn its key on first use"),
        "known-servers": Key(path, None, "file of server keys learned on first use"),
        "backend": Key(string, None, "HOST:PORT of the local service to expose"),
        "log-level": Key(choice(*LOG_LEVELS), None, "debug, info, warning or error"),
        "proxy-protocol": Key(boolean, None, "yes: send each backend connection a PROXY "
                              "protocol v2 header naming the real client"),
    }
)
AGENT_SECTIONS = {AGENT_SECTION: AGENT}


def register_section(name, keys, check=None):
    """Let a module (a hook) own section [name], or every [name...] section if name ends in ":".

    Its parsed values appear in ServerConfig.sections. An unregistered [hook:...] section stays
    an error, so a typo in a hook's section name is caught at load.
    """
    if name in SECTIONS:
        raise ValueError("config section [%s] is already registered" % name)
    SECTIONS[name] = Section(dict(keys), check)


def _server_config_repr(self):
    secrets = {name for name, key in SERVER.keys.items() if key.secret}
    return "ServerConfig(%s)" % ", ".join(
        "%s=%s" % (field.name, _shown(getattr(self, field.name), field.name in secrets))
        for field in dataclasses.fields(self)
    )


ServerConfig = dataclasses.make_dataclass(
    "ServerConfig",
    [("path", Path)] + [(name, Any) for name in SERVER.keys] + [("sections", Mapping)],
    frozen=True,
    repr=False,
    namespace={
        "__module__": __name__,
        "__repr__": _server_config_repr,
        "__doc__": "The server's config: one attribute per [server] key, parsed; `path` is the "
        "file; `sections` maps every other section to its values (a SectionValues).",
    },
)


# --- loading ---------------------------------------------------------------------------------


def load_server(path) -> ServerConfig:
    """Read the server's config file; raise ConfigError naming file, line and fix."""
    path = Path(path).absolute()
    sections = _load(path, SECTIONS)
    server = sections.pop(SERVER_SECTION)
    return ServerConfig(path=path, sections=MappingProxyType(sections), **server)


def load_agent(path) -> dict:
    """Read the agent's config file: the [agent] keys it sets, by long option name.

    Values are strings (paths made absolute against the file's folder), except yes/no keys,
    which are bools; the command line supplies the defaults and overrides these.
    """
    path = Path(path).absolute()
    values = _load(path, AGENT_SECTIONS)[AGENT_SECTION]
    return {name: value if isinstance(value, bool) else str(value)
            for name, value in values.items()}


def _load(path, table):
    """{section: SectionValues} for every section in the file and every exact-named one."""
    text = _read_text(path)
    source = _Source(path, text)
    parser = source.parse(text, main=next(iter(table)))
    result = {name: {} for name in table if not name.endswith(":")}
    for name in parser.sections():
        result[name] = dict(parser[name])
    return {name: source.section(name, raw, table) for name, raw in result.items()}


def _read_text(path):
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            path, None, "cannot read the config file: %s (check the path and its permissions)"
            % reason
        ) from None


class _Source:
    """One config file: its path and where each section and key sits in it, for messages."""

    def __init__(self, path, text):
        self.path = path
        self.lines = text.split("\n")
        self.headers, self.keys = _scan(text)

    def error(self, message, section=None, key=None, line=None):
        line = line or self.keys.get((section, key)) or self.headers.get(section)
        return ConfigError(self.path, line, message)

    def parse(self, text, main):
        """configparser over ``text``, with its errors turned into ConfigErrors."""
        parser = configparser.ConfigParser(
            interpolation=None,
            strict=True,
            empty_lines_in_values=False,  # a blank line ends a value: fewer surprise joins
            default_section=_NO_DEFAULT_SECTION,
        )
        try:
            parser.read_string(text, source=str(self.path))
        except configparser.DuplicateOptionError as error:
            first = self.keys.get((error.section, error.option))
            message = "[%s] duplicate key %s, first set on line %s (keep one of them)"
            raise self.error(message % (error.section, error.option, first), line=error.lineno)
        except configparser.DuplicateSectionError as error:
            first = self.headers.get(error.section)
            message = "duplicate section [%s], first on line %s (merge the two)"
            raise self.error(message % (error.section, first), line=error.lineno)
        except configparser.MissingSectionHeaderError as error:
            message = "%s is outside any section (put [%s] above it)"
            raise self.error(message % (error.line.strip(), main), line=error.lineno)
        except configparser.ParsingError as error:
            line = error.errors[0][0]
            message = "cannot parse %s (write key = value, or [section])"
            raise self.error(message % self.lines[line - 1].strip(), line=line)
        return parser

    def section(self, name, raw, table):
        """Parse one section's raw strings against its schema; defaults fill the rest."""
        schema = self._schema(name, table)
        values = {key: self._value(name, key, text, schema) for key, text in raw.items()}
        for key, spec in schema.keys.items():
            if key not in values and spec.default is not None:
                values[key] = spec.parse(spec.default)
        self._check(name, values, raw, schema)
        values = {key: _resolved(value, self.path.parent) for key, value in values.items()}
        return SectionValues(values, [key for key, spec in schema.keys.items() if spec.secret])

    def _schema(self, name, table):
        if name in table:
            return table[name]
        for prefix in table:
            if prefix.endswith(":") and name.startswith(prefix):
                return table[prefix]
        exact = [known for known in table if not known.endswith(":")]
        listed = ", ".join("[%s]" % (k + "NAME" if k.endswith(":") else k) for k in table)
        message = "unknown section [%s]%s (sections: %s; see %s)"
        raise self.error(message % (name, _did_you_mean(name, exact, "[%s]"), listed, DOCS), name)

    def _value(self, section, key, text, schema):
        spec = schema.keys.get(key)
        if spec is None:
            guess = _did_you_mean(key, schema.keys, "%s")
            message = "[%s] unknown key %s%s (fix the spelling or remove the line; see %s)"
            raise self.error(message % (section, key, guess, DOCS), section, key)
        try:
            if "\n" in text and spec.parse is not string_list:
                raise ValueError("goes on over an indented line (unindent the next line)")
            return spec.parse(text)
        except ValueError as error:
            problem = str(error)
            if re.search(r"\s[#;]", text):
                problem += "; comments go on their own line"
            shown = MASK if spec.secret else text.split("\n")[0] + (" ..." if "\n" in text else "")
            raise self.error("[%s] %s = %s: %s" % (section, key, shown, problem), section, key)

    def _check(self, section, values, raw, schema):
        found = schema.check(values) if schema.check else None
        if found is None:
            return
        keys, problem = found
        key = next((key for key in keys if key in raw), None)
        if key is None:
            raise self.error("[%s] %s" % (section, problem), section)
        shown = MASK if schema.keys[key].secret else raw[key]
        raise self.error("[%s] %s = %s: %s" % (section, key, shown, problem), section, key)


def _scan(text):
    """Line numbers of section headers and keys, found with configparser's own rules.

    configparser keeps no line numbers, so this walks the same lines the same way: full-line
    comments skipped, a blank line ends a value, a line indented deeper than its key
    continues that key's value.
    """
    headers, keys = {}, {}
    section, in_value, indent = None, False, 0
    for number, line in enumerate(io.StringIO(text), start=1):
        stripped = line.strip()
        if not stripped:
            in_value = False
            continue
        if stripped.startswith(("#", ";")):
            continue
        level = len(line) - len(line.lstrip())
        if in_value and level > indent:
            continue
        indent = level
        header = re.match(r"\[(.+)\]", stripped)
        if header:
            section, in_value = header[1], False
            headers.setdefault(section, number)
            continue
        option = re.match(r"(.*?)\s*[=:]", stripped)
        in_value = bool(option and option[1] and section is not None)
        if in_value:
            keys.setdefault((section, option[1].lower()), number)
    return headers, keys


def _did_you_mean(word, candidates, form):
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return ": did you mean %s?" % (form % close[0]) if close else ""


def _resolved(value, folder):
    if isinstance(value, Path) and not value.is_absolute():
        return folder / value
    return value
