"""diglett-admin: grants, sessions and schema of the registry (`diglett-admin grant NAME ...`).

This module owns the command line only: parsing, human tables, JSON on stdout, warnings and
one-line errors on stderr. It talks to the database through diglett.registry alone and never
to the running server: revocation works because the server polls the grants every second.
"""

import argparse
import datetime
import json
import os
import pwd
import sys
import time

from diglett import __version__, config, crypto, hookloader, invitecode
from diglett.cli import explain, invites, logs
from diglett.cli.policyargs import add_policy_options, policy_changes
from diglett.names import InvalidName, validate_subdomain
from diglett.policy import PolicyError
from diglett.registry import Registry, RegistryError, default_actor, iso_time

PROG = "diglett-admin"
DEFAULT_CONFIG = "/etc/diglett.conf"
CONFIG_ENV = "DIGLETT_CONFIG"
REVOKE_NOTICE = "the server disconnects a connected agent within 2 s"
EXIT_ERROR = 1  # argparse uses 2 for usage errors
KICK_WAIT = 5  # seconds to wait for the running server to pick up a kick request


class AdminError(Exception):
    """A user-facing failure of a command; printed as one line."""


# --- command line ------------------------------------------------------------------------


def since_time(text):
    """``30m``, ``12h``, ``7d`` (an age) or an ISO 8601 date -> UNIX seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("use an age like 30m, 12h or 7d, or an ISO date "
                                         "like 2026-11-26T10:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def port_number(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("must be a port number from 1 to 65535")
    return int(text)


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage who may serve which subdomain, and see the tunnels that are up. "
        "Works on the database named in the server's config, with or without a running server.",
    )
    parser.add_argument(
        "-c", "--config", default=os.environ.get(CONFIG_ENV, DEFAULT_CONFIG), metavar="FILE",
        help="server config file (default: $%s or %s)" % (CONFIG_ENV, DEFAULT_CONFIG),
    )
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    grant = commands.add_parser("grant", help="allow a key to serve a subdomain",
                                description="Allow the agent holding KEY to serve NAME.DOMAIN. "
                                "Granting the same NAME and KEY again replaces its port and "
                                "comment.")
    grant.add_argument("name", metavar="NAME", help="subdomain: a-z, 0-9, '-'; stored lowercase")
    grant.add_argument("--key", required=True, metavar="HEX",
                       help="the agent's public key (from `diglett pubkey`), any hex encoding")
    grant.add_argument("--port", type=port_number, metavar="N",
                       help="pin the tunnel to this port (unique among grants)")
    grant.add_argument("--comment", default="", metavar="TEXT", help="a note, e.g. the owner")
    add_policy_options(grant)

    set_policy = commands.add_parser(
        "set", help="change the access policy of a name's grants (live, no reconnect)",
        description="Change the access policy of NAME's grants (of KEY only, with --key) "
        "without re-granting: an option given replaces that option (repeat a list option "
        "for several values), --clear empties one. The running server notices within 2 s "
        "and the Traefik hooks update the live route; the agent stays connected.")
    set_policy.add_argument("name", metavar="NAME")
    set_policy.add_argument("--key", metavar="HEX", help="only the grant to this key")
    add_policy_options(set_policy, clearable=True)

    invites.add_parsers(commands, port_number)

    revoke = commands.add_parser(
        "revoke", help="remove a grant; %s" % REVOKE_NOTICE,
        description="Remove the grant of NAME to KEY, or to every key. Only the database is "
        "written: the running server re-reads the grants every second, so %s." % REVOKE_NOTICE,
    )
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--key", metavar="HEX", help="revoke this key only (default: every key)")

    for name, text in (("grants", "list grants"),
                       ("sessions", "list active sessions, on every gateway"),
                       ("gateways", "list the servers sharing this registry, when each was "
                        "last seen and how many sessions it holds"),
                       ("info", "server key, domain, database and counts")):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("--json", action="store_true", help="print JSON only, on stdout")
    kick = commands.add_parser(
        "kick", help="end the live session of a name (the agent reconnects after a delay)",
        description="Ask the running server to end the live session of NAME. The agent is told "
        "why and waits at least DELAY seconds before it reconnects (revoke the grant to keep "
        "it out). The server polls for requests every second.")
    kick.add_argument("name", metavar="NAME")
    kick.add_argument("--delay", type=int, default=30, metavar="S",
                      help="seconds the agent waits before reconnecting (default 30)")
    status = commands.add_parser(
        "status", help="one name end to end: grants, session, hooks, Traefik, audit",
        description="Explain NAME end to end: its grants, the live session (with traffic, from "
        "the running server's HTTP API), what each hook last did for it, what Traefik routes "
        "for it now, and its latest audit entries.")
    status.add_argument("name", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print JSON only, on stdout")
    audit = commands.add_parser(
        "audit", help="the audit trail: grants, sessions, kicks, hook outcomes",
        description="The audit trail, newest first: grant changes, session starts and ends "
        "(remote address, reason, bytes), kicks and hook outcomes.")
    audit.add_argument("--since", type=since_time, metavar="WHEN",
                       help="only entries since WHEN: an age like 30m, 12h, 7d, or an ISO date")
    audit.add_argument("--name", metavar="NAME", help="only entries for this name")
    audit.add_argument("--json", action="store_true", help="print JSON only, on stdout")
    deliveries = commands.add_parser(
        "deliveries", help="hook deliveries (the outbox): pending, done or dead",
        description="Hook deliveries, newest first: what each hook still has to do, did, or "
        "gave up on (dead) and why.")
    deliveries.add_argument("--state", choices=("pending", "done", "dead"),
                            help="only deliveries in this state")
    deliveries.add_argument("--json", action="store_true", help="print JSON only, on stdout")
    commands.add_parser("migrate", help="apply missing schema migrations",
                        description="Apply missing schema migrations and print their names. "
                        "Other commands do this too when needed.")
    return parser


# --- main ----------------------------------------------------------------------------------


def main(argv=None):
    args = build_parser().parse_args(argv)
    logs.setup("warning")
    registry = None
    try:
        # the file may hold [hooks] and [hook:NAME] too: the server's own file is read here
        cfg = config.load_server(args.config, hookloader.config_sections())
        registry = Registry(cfg.database, migrate=False, create_dirs=True)
        warn_if_not_owner(registry.path)
        applied = registry.migrate()
        COMMANDS[args.command](args, cfg, registry, applied)
    except (config.ConfigError, RegistryError, InvalidName, crypto.KeyFormatError,
            PolicyError, invitecode.InvalidCode, invites.InviteError, AdminError) as exc:
        print("%s: error: %s" % (PROG, exc), file=sys.stderr)
        return EXIT_ERROR
    finally:
        if registry is not None:
            registry.close()
    return 0


def warn(message):
    print("%s: warning: %s" % (PROG, message), file=sys.stderr)


def warn_if_not_owner(path):
    """Root-owned -wal/-shm files (or a root-owned database) lock the service user out."""
    if path is None:
        return
    target = path if path.exists() else path.parent
    if not target.exists():
        return
    owner = target.stat().st_uid
    if owner == os.geteuid():
        return
    owner_name = _user_name(owner)
    warn(
        "%s is owned by %s but you are %s: files created now (the database, its -wal and -shm "
        "files) may become unusable by the server; run as that user, e.g. sudo -u %s %s ..."
        % (target, owner_name, _user_name(os.geteuid()), owner_name, PROG)
    )


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def actor():
    """Who to write in the audit log: the unix user, and who ran sudo."""
    sudo_user = os.environ.get("SUDO_USER")
    user = default_actor()
    if sudo_user and sudo_user != user:
        return "%s (sudo by %s)" % (user, sudo_user)
    return user


# --- commands --------------------------------------------------------------------------------


def cmd_grant(args, cfg, registry, applied):
    changes, clear = policy_changes(args, cfg.domain)
    grant = registry.grant(args.name, args.key, port=args.port, comment=args.comment,
                           actor=actor(), changes=changes, clear=clear)
    pinned = " on port %d" % grant.port if grant.port is not None else ""
    print("granted %s.%s to key %s%s" % (grant.subdomain, cfg.domain,
                                         crypto.fingerprint(grant.key), pinned))
    if grant.policy.summary() != "-":
        print("policy: %s" % grant.policy.summary())


def cmd_set(args, cfg, registry, applied):
    changes, clear = policy_changes(args, cfg.domain)
    if not changes and not clear:
        raise AdminError("nothing to change: give a policy option or --clear (see: %s set "
                         "--help)" % PROG)
    updated = registry.set_policy(args.name, args.key, changes, clear, actor=actor())
    if not updated:
        raise AdminError("no grant of %s to change (see: %s grants)" % (args.name.lower(), PROG))
    for grant in updated:
        print("%s key %s: %s" % (grant.subdomain, crypto.fingerprint(grant.key),
                                 grant.policy.summary()))
    print("the running server applies it to the live route within a few seconds")


def cmd_revoke(args, cfg, registry, applied):
    removed = registry.revoke(args.name, args.key, actor=actor())
    if not removed:
        which = "to key %s " % crypto.fingerprint(crypto.normalize_public_key(args.key)) \
            if args.key else ""
        raise AdminError("no grant of %s %sto revoke (see: %s grants)"
                         % (args.name.lower(), which, PROG))
    print("revoked %d grant%s of %s; %s"
          % (removed, "" if removed == 1 else "s", args.name.lower(), REVOKE_NOTICE))


def cmd_grants(args, cfg, registry, applied):
    grants = registry.grants()
    if args.json:
        return print_json([grant.to_json() for grant in grants])
    rows = [(g.subdomain, crypto.fingerprint(g.key), "-" if g.port is None else str(g.port),
             short_time(g.created), g.comment or "-", g.policy.summary()) for g in grants]
    print_table(("NAME", "KEY", "PORT", "CREATED (UTC)", "COMMENT", "POLICY"), rows,
                "no grants")


def cmd_sessions(args, cfg, registry, applied):
    sessions = registry.active_sessions()
    if args.json:
        return print_json([row.to_json() for row in sessions])
    rows = [(s.subdomain, crypto.fingerprint(s.key), s.gateway or "-",
             "%s:%d" % (s.host, s.port), s.remote, short_time(s.started), s.id)
            for s in sessions]
    print_table(("NAME", "KEY", "GATEWAY", "LISTEN", "REMOTE", "STARTED (UTC)", "SESSION"),
                rows, "no active sessions")


def cmd_gateways(args, cfg, registry, applied):
    """A gateway not seen for gateway_stale_after is gone: a live one ends its sessions."""
    gateways = registry.gateways()
    now = time.time()
    if args.json:
        return print_json([dict(g.to_json(), up=now - g.last_seen <= cfg.gateway_stale_after)
                           for g in gateways])
    rows = [(g.gateway_id, "up" if now - g.last_seen <= cfg.gateway_stale_after else "gone",
             "%.0f s ago" % max(0, now - g.last_seen), str(g.sessions), g.address,
             short_time(g.started)) for g in gateways]
    print_table(("GATEWAY", "STATE", "LAST SEEN", "SESSIONS", "ADDRESS", "STARTED (UTC)"), rows,
                "no gateway has used this registry yet")


def cmd_info(args, cfg, registry, applied):
    server_key, key_problem = server_public_key(cfg.key)
    info = {
        "version": __version__,
        "server_key": server_key,
        "server_key_file": str(cfg.key),
        "domain": cfg.domain,
        "database": registry.location,
        "schema_version": registry.schema_version(),
        "grants": len(registry.grants()),
        "active_sessions": len(registry.active_sessions()),
    }
    if args.json:
        return print_json(info)
    info["server_key"] = server_key or key_problem
    print_table(None, [(name.replace("_", " "), str(value)) for name, value in info.items()])


def cmd_deliveries(args, cfg, registry, applied):
    deliveries = registry.deliveries(args.state)
    if args.json:
        return print_json([delivery.to_json() for delivery in deliveries])
    rows = [(d.hook, d.subdomain, d.kind, d.state, str(d.attempts), short_time(d.created),
             d.last_error or "") for d in deliveries]
    print_table(("HOOK", "NAME", "EVENT", "STATE", "ATTEMPTS", "QUEUED (UTC)", "LAST ERROR"),
                rows, "no deliveries")


def cmd_kick(args, cfg, registry, applied):
    name = validate_subdomain(args.name)
    kick_id = registry.request_kick(name, max(0, args.delay), actor())
    deadline = time.monotonic() + KICK_WAIT
    while time.monotonic() < deadline:
        result = registry.kick_result(kick_id)
        if result is not None:
            if not result.startswith("kicked"):
                raise AdminError("%s: %s" % (name, result))
            print("%s: %s; the agent may reconnect after %d s (revoke the grant to keep it "
                  "out)" % (name, result, max(0, args.delay)))
            return
        time.sleep(0.2)
    registry.cancel_kick(kick_id)
    raise AdminError("no running server answered within %d s; is diglett-server running with "
                     "database %s?" % (KICK_WAIT, registry.location))


def cmd_audit(args, cfg, registry, applied):
    name = validate_subdomain(args.name) if args.name else None
    entries = registry.audit_entries(since=args.since, subdomain=name)
    if args.json:
        return print_json([entry.to_json() for entry in entries])
    rows = [(short_time(e.time), e.actor, e.action, e.subdomain,
             crypto.fingerprint(e.key) if e.key else "-", e.detail) for e in entries]
    print_table(("TIME (UTC)", "ACTOR", "ACTION", "NAME", "KEY", "DETAIL"), rows, "no entries")


def cmd_status(args, cfg, registry, applied):
    name = validate_subdomain(args.name)
    report = explain.status(name, cfg, registry)
    if args.json:
        return print_json(report)
    explain.print_status(report)


def cmd_migrate(args, cfg, registry, applied):
    for name in applied:
        print("applied %s" % name)
    state = "now at" if applied else "already up to date at"
    print("%s: schema %s version %d" % (registry.location, state, registry.schema_version()))


COMMANDS = {
    "grant": cmd_grant,
    "set": cmd_set,
    **invites.COMMANDS,
    "revoke": cmd_revoke,
    "grants": cmd_grants,
    "sessions": cmd_sessions,
    "gateways": cmd_gateways,
    "info": cmd_info,
    "deliveries": cmd_deliveries,
    "kick": cmd_kick,
    "status": cmd_status,
    "audit": cmd_audit,
    "migrate": cmd_migrate,
}


def server_public_key(path):
    """(hex, None) from the server's key file, or (None, why not); never creates the file."""
    if not path.exists():
        return None, "not created yet (the server creates %s on its first start)" % path
    try:
        return crypto.public_hex(crypto.read_private_key(path)), None
    except crypto.KeyFileError as exc:
        return None, "unavailable: %s" % exc


# --- output --------------------------------------------------------------------------------


def short_time(seconds):
    return iso_time(seconds)[:16].replace("T", " ")


def print_json(value):
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(headers, rows, empty=None):
    """Columns padded to their widest cell; the last column is not padded."""
    if not rows and empty:
        print("(%s)" % empty)
        return
    lines = ([headers] if headers else []) + [tuple(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths)] + [line[-1]]
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    sys.exit(main())
