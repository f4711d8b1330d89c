"""diglett.config: the server and agent config files, their errors, and their documentation.

Why ~550 lines: one subject, the config loader: a test per key family and per error message,
each from its own file.
"""

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from diglett import config
from diglett.config import ConfigError, Key, load_agent, load_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "diglett.conf"
DOCS = ROOT / "docs" / "configuration.md"
OPERATIONS = ROOT / "docs" / "operations.md"


def write(tmp_path, text, name="diglett.conf"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, load=load_server):
    with pytest.raises(ConfigError) as caught:
        load(path)
    return str(caught.value)


# --- the reference file and the defaults ------------------------------------------------------


def test_example_file_loads_and_shows_the_real_defaults(tmp_path):
    example = load_server(EXAMPLE)
    empty = load_server(write(tmp_path, ""))
    for name in config.SERVER.keys:
        assert getattr(example, name) == getattr(empty, name), name
    assert example.path == EXAMPLE


def test_defaults(tmp_path):
    cfg = load_server(write(tmp_path, "[server]\n"))
    assert cfg.listen == ("0.0.0.0", 20000)
    assert cfg.http == ("127.0.0.1", 20080)
    assert cfg.domain == "example.com"
    assert cfg.bind == "127.0.0.1"
    assert cfg.ports is None
    assert cfg.key == Path("/var/lib/diglett/server.key")
    assert cfg.database == Path("/var/lib/diglett/registry.db")
    assert (cfg.handshake_timeout, cfg.ping_interval, cfg.dead_after) == (10, 10, 30)
    assert (cfg.max_streams, cfg.open_rate, cfg.open_burst) == (16384, 1000, 2000)
    assert cfg.stream_window == 2 * 1024 * 1024
    assert cfg.memory_budget == 256 * 1024 * 1024
    assert cfg.max_startups == (16, 30, 64)
    assert (cfg.per_source_startups, cfg.penalty_max) == (8, 30)
    assert (cfg.write_stall_timeout, cfg.stream_idle_timeout, cfg.shutdown_timeout) == (30, 900, 10)
    assert cfg.log_level == "info"
    assert cfg.token == ""
    assert dict(cfg.sections) == {}


def test_config_is_frozen(tmp_path):
    cfg = load_server(write(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen = ("127.0.0.1", 1)


def test_values_are_parsed(tmp_path):
    path = write(tmp_path, "\n".join([
        "[server]",
        "listen = [::]:0",
        "http = localhost:0",
        "domain = Tunnel.Example.COM.",
        "bind = ::1",
        "ports = 30000-30999",
        "ping_interval = 2.5",
        "dead_after = 7.5",
        "stream_window = 1MiB",
        "memory_budget = 1 G",
        "max_startups = 0:100:1",
        "stream_idle_timeout = 0",
        "log_level = DEBUG",
    ]))
    cfg = load_server(path)
    assert cfg.listen == ("::", 0)
    assert cfg.http == ("localhost", 0)
    assert cfg.domain == "tunnel.example.com"
    assert cfg.bind == "::1"
    assert cfg.ports == (30000, 30999)
    assert (cfg.ping_interval, cfg.dead_after) == (2.5, 7.5)
    assert cfg.stream_window == 1024**2
    assert cfg.memory_budget == 1024**3
    assert cfg.max_startups == (0, 100, 1)
    assert cfg.stream_idle_timeout == 0
    assert cfg.log_level == "debug"


@pytest.mark.parametrize("text, expected", [
    ("16384", 16384), ("16K", 16384), ("16k", 16384), ("16KiB", 16384), ("2M", 2 * 1024**2),
    ("2 MiB", 2 * 1024**2), ("16M", 16 * 1024**2),
])
def test_sizes(text, expected):
    assert config.SERVER.keys["stream_window"].parse(text) == expected


@pytest.mark.parametrize("text, expected", [("10", 10), ("2.5", 2.5), ("0.25", 0.25)])
def test_durations_keep_int_or_float(text, expected):
    value = config.SERVER.keys["dead_after"].parse(text)
    assert value == expected and type(value) is type(expected)


# --- paths -----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", "[server]\nkey = keys/server.key\ndatabase = registry.db\n")
    monkeypatch.chdir(ROOT)  # the process's folder must not matter
    cfg = load_server(path)
    assert cfg.key == tmp_path / "etc" / "keys" / "server.key"
    assert cfg.database == tmp_path / "etc" / "registry.db"


def test_relative_config_path_is_made_absolute(tmp_path, monkeypatch):
    write(tmp_path, "[server]\nkey = server.key\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_server("diglett.conf")
    assert cfg.path == tmp_path / "diglett.conf"
    assert cfg.key == tmp_path / "server.key"


@pytest.mark.parametrize("url", [
    "sqlite:///relative.db", "sqlite:////var/lib/diglett/r.db", "postgresql://u@db/diglett",
    ":memory:",
])
def test_database_urls_are_kept_as_written(tmp_path, url):
    cfg = load_server(write(tmp_path, "[server]\ndatabase = %s\n" % url))
    assert cfg.database == url


def test_percent_is_literal(tmp_path):
    path = write(tmp_path, "[server]\ntoken = a%b%%c%(x)s\ndatabase = postgresql://u:p%40ss@h/db\n")
    cfg = load_server(path)
    assert cfg.token == "a%b%%c%(x)s"
    assert cfg.database == "postgresql://u:p%40ss@h/db"


# --- secrets ---------------------------------------------------------------------------------


def test_token_is_masked_in_repr(tmp_path):
    cfg = load_server(write(tmp_path, "[server]\ntoken = s3cret-t0ken\n"))
    assert cfg.token == "s3cret-t0ken"
    assert "s3cret-t0ken" not in repr(cfg)
    assert "token=***" in repr(cfg)
    assert "s3cret-t0ken" not in str(cfg)


def test_database_password_is_masked_in_repr(tmp_path):
    cfg = load_server(write(tmp_path, "[server]\ndatabase = postgresql://u:hunter2@h/db\n"))
    assert "hunter2" not in repr(cfg)
    assert "postgresql://u:***@h/db" in repr(cfg)


# --- errors: values, each at its file:line ---------------------------------------------------

BAD_VALUES = [
    ("listen", "0.0.0.0:99999", "port must be 0-65535 (write HOST:PORT, e.g. 0.0.0.0:20000)"),
    ("listen", "0.0.0.0", "missing :PORT"),
    ("listen", ":::20000", "IPv6 address needs brackets"),
    ("listen", "[example.com]:1", "bad host"),
    ("http", "127.0.0.1:http", "port must be 0-65535"),
    ("domain", "bad_name.com", "contains the character '_'"),
    ("domain", "-x.example.com", "starts or ends with '-'"),
    ("domain", "10.0.0.1", "not an IP address"),
    ("bind", "localhost", "must be an IP address"),
    ("ports", "5-1", "1 <= A <= B <= 65535"),
    ("ports", "0-100", "1 <= A <= B <= 65535"),
    ("ports", "20000", "range A-B"),
    ("key", "", "write a file path"),
    ("handshake_timeout", "ten", "must be a number of seconds"),
    ("handshake_timeout", "0", "must be more than 0 seconds"),
    ("ping_interval", "-1", "must be more than 0 seconds"),
    ("ping_interval", "nan", "must be more than 0 seconds"),
    ("stream_idle_timeout", "-5", "must be 0 or more seconds"),
    ("max_streams", "0", "whole number at least 1"),
    ("max_streams", "1.5", "whole number"),
    ("open_burst", "-1", "whole number"),
    ("stream_window", "8K", "from 16K to 16M"),
    ("stream_window", "17M", "from 16K to 16M"),
    ("stream_window", "256KB", "K, M or G"),
    ("memory_budget", "1.5G", "K, M or G"),
    ("memory_budget", "0", "at least 1"),
    ("max_startups", "64:30:16", "START <= FULL"),
    ("max_startups", "16:101:64", "RATE a percentage 0-100"),
    ("max_startups", "16:30", "START:RATE:FULL"),
    ("log_level", "verbose", "must be one of debug, info, warning, error"),
]


@pytest.mark.parametrize("key, value, problem", BAD_VALUES)
def test_bad_value_names_file_line_key_and_fix(tmp_path, key, value, problem):
    # The bad key sits on line 5, after a comment, a blank line and a good key.
    path = write(tmp_path, "# comment\n[server]\n\nshutdown_timeout = 5\n%s = %s\n" % (key, value))
    message = error_of(path)
    assert message.startswith("%s:5: [server] %s = %s: " % (path, key, value))
    assert problem in message


def test_the_documented_example_message(tmp_path):
    path = write(tmp_path, "[server]\n\n\n\n\n\nlisten = 0.0.0.0:99999\n")
    assert error_of(path) == (
        "%s:7: [server] listen = 0.0.0.0:99999: port must be 0-65535 "
        "(write HOST:PORT, e.g. 0.0.0.0:20000)" % path
    )


def test_inline_comment_gets_a_hint(tmp_path):
    message = error_of(write(tmp_path, "[server]\nports = 0  # random\n"))
    assert message.startswith("%s:2: [server] ports = 0  # random: " % (tmp_path / "diglett.conf"))
    assert "comments go on their own line" in message


def test_indented_line_continuing_a_value_is_explained(tmp_path):
    message = error_of(write(tmp_path, "[server]\nkey = k\n  listen = 0.0.0.0:1\n"))
    assert ":2: [server] key = k ...: " in message
    assert "unindent the next line" in message


def test_secret_value_is_masked_in_messages(tmp_path):
    def reject(text):
        raise ValueError("never good enough")

    table = {"token": Key(reject, "", "a secret", secret=True)}
    path = write(tmp_path, "[vault]\ntoken = hunter2\n")
    with pytest.raises(ConfigError) as caught:
        load_server(path, {"vault": config.Section(table)})
    assert str(caught.value) == "%s:2: [vault] token = ***: never good enough" % path


# --- errors: checks across keys --------------------------------------------------------------


def test_dead_after_must_exceed_ping_interval(tmp_path):
    path = write(tmp_path, "[server]\nping_interval = 10\ndead_after = 10\n")
    message = error_of(path)
    assert message.startswith("%s:3: [server] dead_after = 10: " % path)
    assert "dead_after (10) must be more than ping_interval (10)" in message


def test_cross_check_points_at_the_key_the_file_sets(tmp_path):
    path = write(tmp_path, "[server]\nlog_level = info\nping_interval = 60\n")
    assert error_of(path).startswith("%s:3: [server] ping_interval = 60: dead_after (30)" % path)


def test_memory_budget_must_hold_one_window(tmp_path):
    path = write(tmp_path, "[server]\nstream_window = 1M\nmemory_budget = 512K\n")
    assert error_of(path).startswith("%s:3: [server] memory_budget = 512K: " % path)


def test_http_off_loopback_without_a_token_is_allowed(tmp_path):
    """Without a token such a listener serves only /info and /healthz (tests/e2e/test_metrics.py)."""
    path = write(tmp_path, "[server]\nhttp = 0.0.0.0:20080\n")
    cfg = load_server(path)
    assert (cfg.http, cfg.token) == (("0.0.0.0", 20080), "")
    write(tmp_path, "[server]\nhttp = 0.0.0.0:20080\ntoken = t\n")
    assert load_server(path).token == "t"


# --- errors: structure -----------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "[server]\nlisten = 0.0.0.0:1\nping_intervall = 5\n")
    message = error_of(path)
    assert message.startswith("%s:3: [server] unknown key ping_intervall: " % path)
    assert "did you mean ping_interval?" in message


def test_unknown_key_without_a_close_match(tmp_path):
    message = error_of(write(tmp_path, "[server]\nfrobnicate = yes\n"))
    assert ":2: [server] unknown key frobnicate (" in message
    assert "did you mean" not in message


def test_unknown_section_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "[server]\nlisten = 0.0.0.0:1\n\n[sever]\nbind = ::1\n")
    message = error_of(path)
    assert message.startswith("%s:4: unknown section [sever]: did you mean [server]?" % path)


@pytest.mark.parametrize("header", ["[hook:traefik]", "[DEFAULT]", "[Server]"])
def test_unregistered_sections_are_errors(tmp_path, header):
    path = write(tmp_path, "[server]\n%s\nx = 1\n" % header)
    assert error_of(path).startswith("%s:2: unknown section %s" % (path, header))


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "[server]\ndomain = a.com\nbind = ::1\nDomain = b.com\n")
    message = error_of(path)
    assert message.startswith("%s:4: [server] duplicate key domain, first set on line 2" % path)


def test_duplicate_section(tmp_path):
    path = write(tmp_path, "[server]\nbind = ::1\n[server]\ndomain = a.com\n")
    assert error_of(path).startswith("%s:3: duplicate section [server], first on line 1" % path)


def test_key_before_any_section(tmp_path):
    path = write(tmp_path, "# hello\nlisten = 0.0.0.0:1\n")
    message = error_of(path)
    assert message.startswith("%s:2: listen = 0.0.0.0:1 is outside any section" % path)
    assert "put [server] above it" in message


def test_line_without_a_value(tmp_path):
    path = write(tmp_path, "[server]\nbind = ::1\nlisten\n")
    assert error_of(path).startswith("%s:3: cannot parse listen (write key = value" % path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.conf"
    message = error_of(path)
    assert message.startswith("%s: cannot read the config file: " % path)
    assert "No such file" in message


def test_directory_is_not_a_config_file(tmp_path):
    assert error_of(tmp_path).startswith("%s: cannot read the config file: " % tmp_path)


def test_config_error_carries_path_and_line(tmp_path):
    path = write(tmp_path, "[server]\nbind = nowhere\n")
    with pytest.raises(ConfigError) as caught:
        load_server(path)
    assert (caught.value.path, caught.value.line) == (path, 2)


# --- extra sections, passed by the modules that own them (hooks) -----------------------------


def test_extra_prefix_section_is_parsed_with_defaults(tmp_path):
    extra = {"hook:": config.Section({
        "url": Key(config.string, None, "where to post"),
        "timeout": Key(config.seconds(), "5", "seconds per call"),
        "events": Key(config.string_list, "", "signals to send"),
        "secret": Key(config.string, "", "HMAC key", secret=True),
    })}
    path = write(tmp_path, "[server]\n[hook:webhook]\nurl = https://x/%41\nevents = a, b,\n"
                           "secret = hunter2\n")
    cfg = load_server(path, extra)
    assert dict(cfg.sections["hook:webhook"]) == {
        "url": "https://x/%41", "timeout": 5, "events": ("a", "b"), "secret": "hunter2"}
    assert "hunter2" not in repr(cfg)
    assert "hook:webhook" in repr(cfg)


def test_extra_section_errors_name_the_line(tmp_path):
    extra = {"hook:script": config.Section({"timeout": Key(config.seconds(), "5", "seconds")})}

    def load(path):
        return load_server(path, extra)

    path = write(tmp_path, "[hook:script]\ntimeout = soon\n[hook:script2]\n")
    assert error_of(path, load).startswith("%s:2: [hook:script] timeout = soon: " % path)
    write(tmp_path, "[hook:script]\ntimout = 1\n")
    assert "did you mean timeout?" in error_of(path, load)
    write(tmp_path, "[hook:scrip]\n")
    assert "did you mean [hook:script]?" in error_of(path, load)


def test_extra_exact_section_gets_defaults_when_absent(tmp_path):
    extra = {"hooks": config.Section({"enabled": Key(config.string_list, "", "hook names")})}
    assert dict(load_server(write(tmp_path, ""), extra).sections) == {"hooks": {"enabled": ()}}


def test_extra_sections_are_per_call(tmp_path):
    """No table is shared: what one load was given, the next load does not know."""
    path = write(tmp_path, "[hooks]\n")
    load_server(path, {"hooks": config.Section({})})
    assert error_of(path).startswith("%s:1: unknown section [hooks]" % path)


def test_extra_check_runs(tmp_path):
    def check(values):
        if values["low"] > values["high"]:
            return ("low", "high"), "low must not exceed high (swap them)"
        return None

    keys = {"low": Key(config.integer(0), "0", "l"), "high": Key(config.integer(0), "9", "h")}
    path = write(tmp_path, "[range]\nhigh = 3\nlow = 4\n")
    message = error_of(path, lambda path: load_server(path, {"range": config.Section(keys, check)}))
    assert message == "%s:3: [range] low = 4: low must not exceed high (swap them)" % path


def test_an_extra_section_cannot_replace_server(tmp_path):
    with pytest.raises(ValueError):
        load_server(write(tmp_path, ""), {"server": config.Section({})})


# --- the schema, the docs and the example agree --------------------------------------------


def doc_rows(section_heading):
    """{key: table row} of the table under ``## `[section]` `` in docs/configuration.md."""
    text = DOCS.read_text()
    part = text.split(section_heading, 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[0] for m in re.finditer(r"^\| `([a-z_-]+)` \|.*$", part, re.M)}


def test_every_server_key_is_documented_with_its_default():
    rows = doc_rows("## `[server]`")
    assert set(rows) == set(config.SERVER.keys)
    for name, key in config.SERVER.keys.items():
        cells = [cell.strip() for cell in rows[name].split("|")]
        assert cells[3] == ("`%s`" % key.default if key.default else "(empty)"), name


def test_every_server_key_is_in_the_example_with_a_comment_above():
    lines = EXAMPLE.read_text().splitlines()
    for name in config.SERVER.keys:
        found = [i for i, line in enumerate(lines) if re.match(r"%s\s*=" % name, line)]
        assert len(found) == 1, name
        assert lines[found[0] - 1].startswith("#"), name


def test_server_config_has_one_field_per_server_key():
    """ServerConfig is written out (so ``cfg.listen`` can be found); it must follow the schema:
    the [server] keys in order, none missing and none extra, between ``path`` and ``sections``."""
    fields = [field.name for field in dataclasses.fields(config.ServerConfig)]
    assert fields == ["path", *config.SERVER.keys, "sections"]


def conforms(value, hint):
    """isinstance() for the annotations ServerConfig uses: unions, tuples, Mapping[...]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(conforms(value, arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, tuple) and all(conforms(item, args[0]) for item in value)
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(map(conforms, value, args)))
    return isinstance(value, origin or hint)


def test_server_config_field_types_hold_what_the_parsers_return(tmp_path):
    """The annotations are not decoration: defaults and set values alike fit them."""
    hints = typing.get_type_hints(config.ServerConfig)
    empty = load_server(write(tmp_path, ""))
    given = load_server(write(tmp_path, "[server]\nports = 30000-30999\nping_interval = 2.5\n"
                              "proxy_trusted = 10.0.0.0/8, ::1\ndatabase = sqlite:///r.db\n",
                              name="set.conf"))
    for cfg in (empty, given):
        for name, hint in hints.items():
            assert conforms(getattr(cfg, name), hint), (name, getattr(cfg, name), hint)


def test_restart_keys_are_the_documented_ones():
    """A SIGHUP keeps these until a restart (docs/operations.md lists them)."""
    keys = config.restart_keys()
    assert set(keys) == {"listen", "http", "key", "database", "domain", "bind", "token",
                         "listen_tls", "listen_ws", "ws_path", "tls_cert", "tls_key", "workers"}
    assert len(keys) == len(set(keys))
    part = OPERATIONS.read_text().split("- Kept until a restart", 1)[1].split("\n- ", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", part)) == set(keys)


def test_every_agent_key_is_documented():
    assert set(doc_rows("## The agent's file")) == set(config.AGENT.keys)


def test_every_default_parses_and_every_key_has_a_doc():
    for section in (config.SERVER, config.AGENT):
        for name, key in section.keys.items():
            assert key.doc, name
            if key.default is not None:
                key.parse(key.default)


# --- the agent's file ------------------------------------------------------------------------


def test_agent_file(tmp_path):
    path = write(tmp_path, "\n".join([
        "[agent]",
        "gateway = tunnel.example.com:20000",
        "name = foo",
        "key-file = keys/agent.key",
        "known-servers = /home/a/known_servers",
        "server-key = 02%s" % ("ab" * 32),
        "info-url = https://tunnel.example.com/info?x=%20",
        "backend = 127.0.0.1:8080",
        "log-level = WARNING",
    ]), name="agent.conf")
    assert load_agent(path) == {
        "gateway": "tunnel.example.com:20000",
        "name": "foo",
        "key-file": str(tmp_path / "keys" / "agent.key"),
        "known-servers": "/home/a/known_servers",
        "server-key": "02" + "ab" * 32,
        "info-url": "https://tunnel.example.com/info?x=%20",
        "backend": "127.0.0.1:8080",
        "log-level": "warning",
    }


def test_agent_file_returns_only_what_it_sets(tmp_path):
    assert load_agent(write(tmp_path, "[agent]\nname = foo\n")) == {"name": "foo"}
    assert load_agent(write(tmp_path, "")) == {}


def test_agent_unknown_key(tmp_path):
    path = write(tmp_path, "[agent]\nname = foo\nkey_file = a.key\n")
    message = error_of(path, load_agent)
    assert message.startswith("%s:3: [agent] unknown key key_file: did you mean key-file?" % path)


def test_agent_errors(tmp_path):
    path = write(tmp_path, "[agent]\nlog-level = loud\n")
    assert error_of(path, load_agent).startswith("%s:2: [agent] log-level = loud: " % path)
    write(tmp_path, "[agent]\nname = a\n[server]\nlisten = 0.0.0.0:1\n")
    assert error_of(path, load_agent).startswith("%s:3: unknown section [server] " % path)
    write(tmp_path, "[agent]\nname = a\nname = b\n")
    assert error_of(path, load_agent).startswith("%s:3: [agent] duplicate key name" % path)
    assert error_of(tmp_path / "missing", load_agent).startswith(str(tmp_path / "missing"))


# --- real client address -----------------------------------------------------------------------


def test_proxy_trusted_is_a_tuple_of_networks(tmp_path):
    import ipaddress

    assert load_server(write(tmp_path, "[server]\n")).proxy_trusted == ()
    cfg = load_server(write(tmp_path, "[server]\nproxy_trusted = 127.0.0.1, 10.0.0.0/8, ::1\n"))
    assert cfg.proxy_trusted == (ipaddress.ip_network("127.0.0.1/32"),
                                 ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
    path = write(tmp_path, "[server]\nproxy_trusted = 127.0.0.1, traefik\n")
    assert error_of(path).startswith(
        "%s:2: [server] proxy_trusted = 127.0.0.1, traefik: traefik is not an IP address" % path)


def test_agent_proxy_protocol_is_a_bool(tmp_path):
    assert load_agent(write(tmp_path, "[agent]\nproxy-protocol = yes\n")) == {"proxy-protocol": True}
    assert load_agent(write(tmp_path, "[agent]\nproxy-protocol = no\n")) == {"proxy-protocol": False}
    path = write(tmp_path, "[agent]\nproxy-protocol = maybe\n")
    assert error_of(path, load_agent).startswith("%s:2: [agent] proxy-protocol = maybe" % path)
