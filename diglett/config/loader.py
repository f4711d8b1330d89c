"""Reading config files: text -> parsed, checked, frozen values, or one ConfigError.

This module owns reading a file with configparser (interpolation off, so ``%`` in secrets and
URLs is literal), the line numbers that messages point at, and ConfigError, whose message names
the file, the line and the fix. Which sections a file may hold is an argument: [server] or
[agent] from diglett.config.schema, plus the ``extra_sections`` the caller passes (the hooks',
from diglett.hookloader), so nothing here changes at run time. Loading has no side effects: it
must not create the key file or the database, open sockets, or configure logging; the server
does that with the values it gets here.
"""

import configparser
import difflib
import io
import re
from pathlib import Path
from types import MappingProxyType

from diglett.config.parsers import string_list
from diglett.config.schema import AGENT, AGENT_SECTION, SERVER, SERVER_SECTION, secret_keys
from diglett.config.values import MASK, SectionValues, ServerConfig

DOCS = "docs/configuration.md"  # where messages send the reader for the list of keys
_NO_DEFAULT_SECTION = "\0"  # turns off configparser's [DEFAULT] merging: [DEFAULT] is unknown


class ConfigError(Exception):
    """A config file that cannot be used. str() names the file, the line and how to fix it."""

    def __init__(self, path, line, message):
        self.path = path
        self.line = line
        where = "%s:%d" % (path, line) if line else str(path)
        super().__init__("%s: %s" % (where, message))


def load_server(path, extra_sections=None) -> ServerConfig:
    """Read the server's config file; raise ConfigError naming file, line and fix.

    ``extra_sections`` maps a section name to the Section that owns it, for sections other
    modules define (hookloader.config_sections()); a name ending in ":" is a prefix, so
    "hook:" would own every [hook:NAME] section. Any other section is an error, so a typo in a
    section's name is caught at load. Their parsed values are in ``ServerConfig.sections``.
    """
    extra = dict(extra_sections or {})
    if SERVER_SECTION in extra:  # a caller's bug, not the file's: not a ConfigError
        raise ValueError("config section [%s] is the server's own; it cannot be replaced"
                         % SERVER_SECTION)
    path = Path(path).absolute()
    # [server] first: it is the section named in "put [server] above it" and listed first.
    sections = _load(path, {SERVER_SECTION: SERVER, **extra})
    server = sections.pop(SERVER_SECTION)
    return ServerConfig(path=path, sections=MappingProxyType(sections), **server)


def load_agent(path) -> dict:
    """Read the agent's config file: the [agent] keys it sets, by long option name.

    Values are strings (paths made absolute against the file's folder), except yes/no keys,
    which are bools; the command line supplies the defaults and overrides these.
    """
    path = Path(path).absolute()
    values = _load(path, {AGENT_SECTION: AGENT})[AGENT_SECTION]
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
        return SectionValues(values, secret_keys(schema))

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
