"""Configuration files: the server's INI file and the agent's, read once into frozen values.

The package is split by job: ``parsers`` (text of one value -> value), ``schema`` (every
section and key: parser, default, doc, whether a SIGHUP applies it), ``values`` (the frozen
ServerConfig and SectionValues, secrets masked in reprs) and ``loader`` (reading a file, errors
naming file, line and fix). This module only re-exports what the rest of diglett uses, so
callers write ``from diglett import config; config.load_server(path, sections)``; it must hold
no code and no state of its own.
"""

from diglett.config.loader import ConfigError, load_agent, load_server
from diglett.config.parsers import (
    boolean, choice, database, dns_name, gateway_id, host_port, integer, ip_address, networks,
    path, port_range, seconds, size, startups, string, string_list,
)
from diglett.config.schema import (
    AGENT, AGENT_SECTION, LOG_LEVELS, SERVER, SERVER_SECTION, Key, Section, restart_keys,
)
from diglett.config.values import SectionValues, ServerConfig

__all__ = [
    "AGENT", "AGENT_SECTION", "LOG_LEVELS", "SERVER", "SERVER_SECTION",
    "ConfigError", "Key", "Section", "SectionValues", "ServerConfig",
    "load_agent", "load_server", "restart_keys",
    "boolean", "choice", "database", "dns_name", "gateway_id", "host_port", "integer",
    "ip_address", "networks", "path", "port_range", "seconds", "size", "startups", "string",
    "string_list",
]
