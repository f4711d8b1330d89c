"""The schema of the config files: every section and key, its parser, default and doc.

This module owns Key and Section, the [server] and [agent] tables, the checks across their keys,
and which keys a SIGHUP may apply (``live``). It is data: it must not read files, hold state
that changes at run time, or know about hooks. Sections other modules own (the hooks') are
passed to the loader as an argument, never added here.
"""

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from diglett.config.parsers import (
    boolean, choice, database, dns_name, format_size, gateway_id, host_port, integer,
    ip_address, networks, optional, path, port_range, seconds, size, startups, string, url_path,
    workers,
)

SERVER_SECTION = "server"
AGENT_SECTION = "agent"
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_STREAM_WINDOW = 16 * 1024  # below this every stream stalls on round trips
MAX_STREAM_WINDOW = 16 * 1024 * 1024  # bound on what one stream may buffer at the peer
MIN_GATEWAY_STALE_AFTER = 3  # seconds: gateways refresh their row at a third of it, at least 1 s


@dataclass(frozen=True)
class Key:
    """One key: how to parse its text, its default as written in a file, one line of doc.

    ``default=None`` means no default: the key is left out of the result unless the file sets
    it. A ``secret`` value is masked in reprs and in error messages. ``live=False`` means a
    SIGHUP does not apply a change: the running server keeps the old value until a restart
    (a listening socket, an open database or a key cannot be swapped under live sessions).
    """

    parse: Callable[[str], Any]
    default: str | None
    doc: str
    secret: bool = False
    live: bool = True


@dataclass(frozen=True)
class Section:
    """The keys of one section, and an optional check across them.

    ``check(values)`` returns None, or ``(keys, problem)``: the message points at the first of
    ``keys`` set in the file (else at the section header), so write ``problem`` without
    assuming which key that is.
    """

    keys: Mapping[str, Key]
    check: Callable[[Mapping[str, Any]], tuple | None] | None = None


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
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        return ("tls_cert", "tls_key"), (
            "tls_cert and tls_key go together (set both, or neither for a self-signed "
            "certificate)")
    if values["memory_budget"] < values["stream_window"]:
        return ("memory_budget", "stream_window"), (
            "memory_budget (%s) must be at least stream_window (%s) (raise memory_budget)"
            % (format_size(values["memory_budget"]), format_size(values["stream_window"]))
        )
    return None


# The order of the keys is the order of ServerConfig's fields and of its repr.
SERVER = Section(
    {
        "listen": Key(host_port, "0.0.0.0:20000", "HOST:PORT agents dial; IPv6 as [::]:20000",
                      live=False),
        "http": Key(host_port, "127.0.0.1:20080", "HOST:PORT of the HTTP API (/info, /healthz)",
                    live=False),
        "domain": Key(dns_name, "example.com", "public parent domain: tunnel foo is foo.DOMAIN",
                      live=False),
        "bind": Key(ip_address, "127.0.0.1", "IP address the per-agent tunnel listeners bind",
                    live=False),
        "ports": Key(port_range, "0", "tunnel ports: 0 = a random free port, or a range A-B"),
        "proxy_trusted": Key(networks, "", "IPs/CIDRs whose connections to a tunnel port start "
                             "with a PROXY protocol header naming the real client"),
        "key": Key(path, "/var/lib/diglett/server.key", "server static key file (made 0600)",
                   live=False),
        "database": Key(database, "/var/lib/diglett/registry.db", "SQLite path or database URL",
                        live=False),
        "gateway_id": Key(gateway_id, "", "this server's name in a shared registry (empty: the "
                          "host name)"),
        "gateway_stale_after": Key(seconds(), "30", "seconds after which another gateway that "
                                   "stopped refreshing its row has its sessions ended"),
        "workers": Key(workers, "0", "worker processes sharing the agent port, each serving "
                       "its own agents (0 = one per core; 1 = a single process)", live=False),
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
        "restart_drain": Key(seconds(False), "2", "seconds open streams may run on after "
                             "SIGTERM when the ports are handed to the next run (fd store)"),
        "hold_timeout": Key(seconds(False), "10", "seconds a name's tunnel port keeps listening "
                            "and holds new visitors after its agent left (0 = close at once)"),
        "hold_max_visitors": Key(integer(0), "256", "visitors one name holds while no agent "
                                 "serves it; more are reset"),
        "shutdown_timeout": Key(seconds(False), "10", "seconds for sessions to end and hooks "
                                "to finish after the drain"),
        "log_level": Key(choice(*LOG_LEVELS), "info", "debug, info, warning or error"),
        "log_format": Key(choice("text", "json"), "text", "text (key=value pairs) or json"),
        "audit_retention": Key(seconds(), "7776000", "seconds audit entries are kept (90 days)"),
        "token": Key(string, "", "bearer token for /metrics, /api/tunnels and / when http is "
                     "not loopback (empty: only /info and /healthz are served there)",
                     secret=True, live=False),
        # reach: the same agent sessions inside TLS or a WebSocket, for networks where only
        # HTTPS gets out (diglett.gateway.transports)
        "listen_tls": Key(optional(host_port), "", "HOST:PORT agents reach with tls:// (Traefik "
                          "passes their SNI through to it); empty: off", live=False),
        "listen_ws": Key(optional(host_port), "", "HOST:PORT of the plain WebSocket listener "
                         "Traefik forwards wss:// upgrades to; empty: off", live=False),
        "ws_path": Key(url_path, "/diglett", "the URL path of the WebSocket listener",
                       live=False),
        "tls_cert": Key(optional(path), "", "PEM certificate of listen_tls (empty: a "
                        "self-signed one, made next to key)", live=False),
        "tls_key": Key(optional(path), "", "PEM private key of tls_cert", live=False),
    },
    check=_check_server,
)

AGENT = Section(
    {
        "gateway": Key(string, None, "HOST:PORT of the server's listen address, or "
                       "tls://HOST[:443] or wss://HOST[:443]/PATH"),
        "name": Key(string, None, "the subdomain this agent asks for"),
        "key-file": Key(path, None, "the agent's private key file"),
        "server-key": Key(string, None, "the server's public key (hex) to pin"),
        "info-url": Key(string, None, "URL of the server's /info, to learn its key on first use"),
        "known-servers": Key(path, None, "file of server keys learned on first use"),
        "backend": Key(string, None, "HOST:PORT of the local service to expose"),
        "log-level": Key(choice(*LOG_LEVELS), None, "debug, info, warning or error"),
        "proxy-protocol": Key(boolean, None, "yes: send each backend connection a PROXY "
                              "protocol v2 header naming the real client"),
        "proxy": Key(string, None, "http://[USER:PASS@]HOST:PORT or socks5://...: dial the "
                     "gateway through this proxy (none: never; unset: https_proxy etc.)",
                     secret=True),
    }
)


def restart_keys():
    """The [server] keys a SIGHUP leaves as they were (``live=False``), in schema order."""
    return tuple(name for name, key in SERVER.keys.items() if not key.live)


def secret_keys(section):
    """The names of ``section``'s keys whose values are masked in reprs and messages."""
    return frozenset(name for name, key in section.keys.items() if key.secret)
