"""The access-policy options of `diglett-admin grant`, `set` and `invite`, and what they mean.

This module owns the argparse side only: declaring --alias, --mode, --basic-auth, --allow,
--forward-auth, --middleware (and --clear) and turning parsed arguments into the
``changes``/``clear`` that diglett.registry takes. The checks live in diglett.policy, so the
CLI, the write API and the registry refuse the same values with the same reasons.
"""

from diglett import policy
from diglett.policy import OPTION_NAMES, PolicyError

LIST_OPTIONS = ("alias", "basic-auth", "allow", "middleware")  # repeatable


def add_policy_options(parser, clearable=False):
    group = parser.add_argument_group(
        "access policy", "what Traefik does in front of the route (docs/operations.md, "
        "\"Access policy\"); on an existing grant an option given replaces that option")
    group.add_argument("--alias", action="append", metavar="HOST",
                       help="another host for the same route, e.g. www.customer.com "
                       "(repeatable; with a cert resolver each gets its certificate)")
    group.add_argument("--mode", choices=policy.MODES,
                       help="http (Host rule) or tcp (HostSNI, TLS passthrough); default: "
                       "the hook's mode")
    group.add_argument("--basic-auth", action="append", metavar="USER:HASH",
                       help="an htpasswd bcrypt or apr1 entry, e.g. from `htpasswd -nB alice` "
                       "(repeatable; plain passwords are refused)")
    group.add_argument("--allow", action="append", metavar="CIDR",
                       help="a source network allowed in, e.g. 203.0.113.0/24 (repeatable; "
                       "default: every source)")
    group.add_argument("--forward-auth", metavar="URL",
                       help="ask this server about every request (oauth2-proxy, Authelia, "
                       "Authentik)")
    group.add_argument("--middleware", action="append", metavar="NAME",
                       help="an existing Traefik middleware, e.g. ratelimit@file (repeatable)")
    if clearable:
        group.add_argument("--clear", action="append", default=[], metavar="OPTION",
                           choices=sorted(OPTION_NAMES) + ["all"],
                           help="empty this option (%s, or all; repeatable)"
                           % ", ".join(sorted(OPTION_NAMES)))


def policy_changes(args, domain):
    """({Policy field: value}, [fields to clear]) from parsed arguments, checked."""
    changes = {}
    for option, name in OPTION_NAMES.items():
        value = getattr(args, option.replace("-", "_"), None)
        if value is not None:
            changes[name] = tuple(value) if option in LIST_OPTIONS else value
    cleared = getattr(args, "clear", None) or []
    clear = list(OPTION_NAMES.values()) if "all" in cleared else [
        OPTION_NAMES[option] for option in cleared]
    both = sorted(set(clear) & set(changes))
    if both:
        raise PolicyError("--clear %s and a new value at once; give one" % ", ".join(both))
    policy.check_outside(changes.get("aliases", ()), domain)
    return changes, clear
