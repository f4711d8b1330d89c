"""diglett-admin's enrolment commands: `invite NAME`, `invites` and `uninvite ID`.

This module owns their arguments and output; diglett-admin (diglett.cli.admin) registers them
and lends its output helpers, imported at call time because admin imports this module (plain
functions: a second copy of admin under ``python -m`` does no harm). The code's format is
diglett.invitecode's, the invites table diglett.registry's.
"""

import argparse
import time

from diglett import crypto, invitecode
from diglett.cli.policyargs import add_policy_options, policy_changes


class InviteError(Exception):
    """A user-facing failure of these commands, printed as one line like AdminError (its own
    class: admin may run as __main__, a second copy of the module)."""


def duration(text):
    """``90s``, ``30m``, ``1h``, ``2d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if not (text[:-1].isdigit() and text[-1:] in units and int(text[:-1]) > 0):
        raise argparse.ArgumentTypeError("use a duration like 90s, 30m, 1h or 2d")
    return int(text[:-1]) * units[text[-1]]


def add_parsers(commands, port_number):
    """The three subcommands, on diglett-admin's ``commands``."""
    invite = commands.add_parser(
        "invite", help="print a one-time enrolment code for a name (diglett enroll CODE)",
        description="Print one line, an enrolment code holding the gateway address(es), the "
        "server's public key and a one-time secret. On the agent's machine `diglett enroll "
        "CODE` makes the key, pins the server key and binds NAME's grant (with the options "
        "given here) to that key. The code works once and expires after --ttl.")
    invite.add_argument("name", metavar="NAME")
    invite.add_argument("--ttl", type=duration, default="1h", metavar="AGE",
                        help="how long the code stays valid: 30m, 1h, 2d (default 1h)")
    invite.add_argument("--gateway", action="append", metavar="GATEWAY",
                        help="what agents dial, in the agent's --gateway form: HOST:PORT, "
                        "tls://HOST[:443] or wss://HOST[:443]/PATH (repeatable; default: the "
                        "live gateways' raw agent ports)")
    invite.add_argument("--port", type=port_number, metavar="N",
                        help="pin the tunnel to this port")
    invite.add_argument("--comment", default="", metavar="TEXT", help="a note for the grant")
    add_policy_options(invite)
    invites = commands.add_parser("invites", help="list enrolment invites: open, used, expired",
                                  description="List enrolment invites (their secrets are not "
                                  "stored, so no code can be printed again).")
    invites.add_argument("--json", action="store_true", help="print JSON only, on stdout")
    uninvite = commands.add_parser("uninvite", help="withdraw an invite by its id",
                                   description="Withdraw an invite (see `invites` for ids).")
    uninvite.add_argument("invite_id", metavar="ID")


def cmd_invite(args, cfg, registry, applied):
    from diglett.cli import admin  # at call time: admin imports this module

    server_key, problem = admin.server_public_key(cfg.key)
    if server_key is None:
        raise InviteError("the server key is %s" % problem)
    gateways = invite_gateways(args.gateway, cfg, registry)
    changes, _ = policy_changes(args, cfg.domain)
    row, secret = registry.create_invite(args.name, args.ttl, changes, port=args.port,
                                         comment=args.comment, actor=admin.actor())
    code = invitecode.encode(invitecode.Invite(gateways, server_key, row.subdomain, row.id,
                                               secret))
    print(code)
    admin.warn("invite %s for %s.%s via %s, valid until %s UTC, works once; on the agent: "
         "diglett enroll CODE" % (row.id, row.subdomain, cfg.domain, gateways,
                                  admin.short_time(row.expires)))


def invite_gateways(given, cfg, registry):
    """The --gateway addresses, checked, or the live gateways' agent listeners."""
    if given:
        if any("," in text for text in given):
            raise InviteError("--gateway takes one gateway; repeat --gateway for several")
        try:
            return ",".join(invitecode.gateway_entry(text) for text in given)
        except ValueError as exc:
            raise InviteError("--gateway: %s" % exc) from None
    now = time.time()
    live = [g.address for g in registry.gateways()
            if now - g.last_seen <= cfg.gateway_stale_after]
    wildcard = [a for a in live if a.rpartition(":")[0] in ("0.0.0.0", "::", "[::]", "")]
    if not live or wildcard:
        raise InviteError("no gateway address for the code: %s; pass --gateway HOST:PORT "
                         "(the address agents dial)" % (
                             "%s listens on every address" % wildcard[0] if wildcard
                             else "no live gateway has reported its address"))
    return ",".join(sorted(live))


def cmd_invites(args, cfg, registry, applied):
    from diglett.cli import admin

    invites = registry.invites()
    now = time.time()
    if args.json:
        return admin.print_json([row.to_json(now) for row in invites])
    rows = [(i.id, i.subdomain, i.state(now), admin.short_time(i.expires),
             crypto.fingerprint(i.used_by) if i.used_by else "-", i.policy.summary())
            for i in invites]
    admin.print_table(("ID", "NAME", "STATE", "EXPIRES (UTC)", "KEY", "POLICY"), rows, "no invites")


def cmd_uninvite(args, cfg, registry, applied):
    from diglett.cli import admin

    if not registry.delete_invite(args.invite_id.lower(), actor=admin.actor()):
        raise InviteError("no invite %s (see: %s invites)" % (args.invite_id, admin.PROG))
    print("withdrew invite %s" % args.invite_id)


COMMANDS = {
    "invite": cmd_invite,
    "invites": cmd_invites,
    "uninvite": cmd_uninvite,
}
