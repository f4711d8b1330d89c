"""diglett: the agent, e.g. ``diglett -g gw.example.com:20000 -n foo --server-key HEX 127.0.0.1:8080``.

Also ``diglett keygen`` and ``diglett pubkey``. A backend such as 127.0.0.1:80 is never
taken for a subcommand: only the exact words in SUBCOMMANDS are.
"""

# No gevent monkey-patching here: the agent does all its I/O on gevent's own sockets
# (diglett.agent imports gevent.socket), and the one blocking call it makes, the --info-url
# fetch, runs before any greenlet. Patching would import ~90 more modules, about 4.5 MiB per
# agent process (measured as PSS).
import argparse
import signal
import sys
from pathlib import Path

import gevent

from diglett import __version__, agent, config, crypto, known_servers, names
from diglett.cli import logs
from diglett.reach import gateway_url
from diglett.reach import proxy as proxies

DEFAULT_KEY_FILE = Path("~/.config/diglett/agent.key")
KNOWN_SERVERS_NAME = "known_servers"  # default file, next to the key file
SUBCOMMANDS = ("keygen", "pubkey", "demo", "enroll")
OPTIONS = ("gateway", "name", "key-file", "server-key", "info-url", "known-servers",
           "backend", "log-level", "proxy-protocol",
           "proxy")  # also the keys of the [agent] section


class UsageError(Exception):
    pass


def fail(message, code=agent.EXIT_USAGE):
    print("diglett: error: %s" % message, file=sys.stderr)
    return code


def host_port(text, what):
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text  # a bare port means a local backend
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError("%s must be HOST:PORT with a port 1-65535, got %r" % (what, text))
    return host, int(port)


def key_parser(prog, description):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                        help="agent key file (default: %s)" % DEFAULT_KEY_FILE)
    return parser


def keygen(argv):
    args = key_parser("diglett keygen", "Create the agent's key and print its public key, "
                      "which the operator grants with `diglett-admin grant NAME --key ...`."
                      ).parse_args(argv)
    path = args.key_file.expanduser()
    try:
        key = crypto.generate_private_key()
        crypto.write_private_key(path, key)
    except (crypto.KeyFileError, OSError) as exc:
        return fail(exc)
    print(crypto.public_hex(key))
    print("wrote %s" % path, file=sys.stderr)
    return 0


def pubkey(argv):
    args = key_parser("diglett pubkey", "Print the agent's public key.").parse_args(argv)
    try:
        print(crypto.public_hex(crypto.read_private_key(args.key_file.expanduser())))
    except crypto.KeyFileError as exc:
        return fail("%s (create one with `diglett keygen`)" % exc)
    return 0


def demo(argv):
    from diglett import demo as local_demo  # only the demo needs http.server and friends

    return local_demo.main(argv)


def enroll(argv):
    from diglett.cli import enroll as enrolment

    return enrolment.main(argv, DEFAULT_KEY_FILE, KNOWN_SERVERS_NAME)


def run_parser():
    parser = argparse.ArgumentParser(
        prog="diglett", usage="diglett [options] BACKEND | diglett {keygen,pubkey} [--key-file F] | diglett demo | diglett enroll CODE",
        description="Expose BACKEND (HOST:PORT of a local service) as NAME.DOMAIN through a "
        "diglett server. Exit codes: 0 stopped, 2 bad arguments/config/key file, 3 no grant, "
        "4 invalid name, 5 server key mismatch, 6 revoked, 7 replaced by another agent with "
        "the same key, 8 wire version mismatch, 9 refused by the proxy; everything else is "
        "retried.")
    parser.add_argument("backend", nargs="?", metavar="BACKEND", help="HOST:PORT to expose")
    parser.add_argument("-g", "--gateway", metavar="URL",
                        help="the server's agent port: HOST:PORT (raw TCP), tls://HOST[:443] "
                             "or wss://HOST[:443]/PATH (through port 443); a fleet: several, "
                             "comma-separated, or a name with several addresses (tried in turn)")
    parser.add_argument("--proxy", metavar="URL",
                        help="dial through this proxy: http://[USER:PASS@]HOST:PORT (CONNECT) "
                             "or socks5[h]://...; default: https_proxy, all_proxy and no_proxy "
                             "from the environment, as curl; 'none': never a proxy")
    parser.add_argument("-n", "--name", help="the subdomain to ask for")
    parser.add_argument("-c", "--config", type=Path,
                        help="agent config file with an [agent] section (flags override it)")
    parser.add_argument("--key-file", help="agent key file (default: %s)" % DEFAULT_KEY_FILE)
    parser.add_argument("--server-key", metavar="HEX", help="the server's public key to pin")
    parser.add_argument("--info-url", metavar="URL",
                        help="the server's /info URL: learn and pin its key on first use")
    parser.add_argument("--known-servers", metavar="PATH",
                        help="file of pinned server keys (default: next to the key file)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS)
    parser.add_argument("--proxy-protocol", action=argparse.BooleanOptionalAction,
                        help="write a PROXY protocol v2 header to each backend connection, "
                        "naming the real client's address and port (the backend must expect it)")
    parser.add_argument("-v", "--verbose", action="store_const", const="debug",
                        dest="log_level", help="debug logging (same as --log-level debug)")
    parser.add_argument("--version", action="version", version="diglett %s" % __version__)
    return parser


def settings(args):
    """Flags over the config file over defaults, by long option name."""
    values = config.load_agent(args.config) if args.config else {}
    for option in OPTIONS:
        flag = getattr(args, option.replace("-", "_"))
        if flag is not None:
            values[option] = flag
    if not values.get("gateway") and values.get("name"):  # `diglett enroll` remembered it
        from diglett.cli import enroll as enrolment

        key_file = Path(values.get("key-file") or DEFAULT_KEY_FILE).expanduser()
        values["gateway"] = enrolment.gateway_of(key_file.parent / enrolment.ENROLLED_NAME,
                                                 values["name"].lower())
    for required in ("gateway", "name", "backend"):
        if not values.get(required):
            raise UsageError("missing %s (give it on the command line or in the [agent] "
                             "section of a config file)" % required.upper()
                             if required == "backend" else "missing --%s" % required)
    values.setdefault("key-file", str(DEFAULT_KEY_FILE))
    values["key-file"] = str(Path(values["key-file"]).expanduser())
    values.setdefault("known-servers",
                      str(Path(values["key-file"]).parent / KNOWN_SERVERS_NAME))
    values.setdefault("log-level", "info")
    values.setdefault("proxy-protocol", False)
    return values


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return {"keygen": keygen, "pubkey": pubkey, "demo": demo,
                "enroll": enroll}[argv[0]](argv[1:])
    args = run_parser().parse_args(argv)
    try:
        values = settings(args)
        gateway = gateway_url.parse_list(values["gateway"])
        for each in gateway:  # a bad proxy URL (flag or environment) is a usage error now
            proxies.choose(each, values.get("proxy"))
        backend = host_port(values["backend"], "BACKEND")
        name = names.validate_subdomain(values["name"])
    except config.ConfigError as exc:
        return fail(exc)
    except (UsageError, gateway_url.GatewayUrlError, proxies.ProxyUrlError) as exc:
        return fail(exc)
    except names.InvalidName as exc:
        return fail("--name: %s" % exc, agent.EXIT_INVALID_NAME)
    logs.setup(values["log-level"])
    try:
        aead = crypto.get_backend().name
    except ValueError as exc:
        return fail("%s: %s" % (crypto.AEAD_ENV, exc))
    try:
        key = crypto.read_private_key(values["key-file"])
    except crypto.KeyFileError as exc:
        return fail("%s (create one with `diglett keygen --key-file %s`)"
                    % (exc, values["key-file"]))
    gateway_text = values["gateway"]
    try:
        server_key, source = known_servers.resolve(
            gateway_text, values.get("server-key"), values.get("info-url"),
            values["known-servers"], notify=lambda line: print(line, file=sys.stderr))
    except known_servers.TrustError as exc:
        return fail(exc)
    tunnel_agent = agent.Agent(
        gateway, name, key, server_key, backend, proxy_protocol=values["proxy-protocol"],
        proxy=values.get("proxy"),
        on_mismatch=lambda: known_servers.mismatch_message(
            gateway_text, server_key, source, values.get("info-url")))
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, tunnel_agent.stop)
    return tunnel_agent.run()


if __name__ == "__main__":
    sys.exit(main())
