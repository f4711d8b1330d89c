"""``diglett enroll CODE``: join a gateway with the one line `diglett-admin invite` printed.

This module owns the agent's side of enrolment: the key (made if there is none), pinning the
server key from the code in known_servers, one session that proves the invite, and the
``enrolled`` file (``NAME GATEWAYS`` lines next to the key file) from which ``diglett -n NAME
BACKEND`` later takes its gateway. The code's format is diglett.invitecode's; the session is
diglett.agent's.
"""

import argparse
import sys
from pathlib import Path

import gevent

from diglett import agent, crypto, invitecode, known_servers
from diglett.reach import proxy as proxies

ENROLLED_NAME = "enrolled"  # file next to the key file: one "NAME GATEWAYS" line per name


def parser(default_key_file):
    p = argparse.ArgumentParser(
        prog="diglett enroll", description="Join a diglett gateway with an enrolment code "
        "from `diglett-admin invite NAME`: makes the agent key if there is none, pins the "
        "server key, proves the code's one-time secret inside the encrypted session, and "
        "remembers the gateway, so that `diglett -n NAME BACKEND` needs no other flag.")
    p.add_argument("code", metavar="CODE", help="the code (starts with %s)" % invitecode.PREFIX)
    p.add_argument("--key-file", type=Path, default=default_key_file,
                   help="agent key file, made if missing (default: %s)" % default_key_file)
    p.add_argument("--proxy", metavar="URL",
                   help="dial through this proxy, as the agent's --proxy (default: https_proxy, "
                   "http_proxy, all_proxy and no_proxy from the environment; 'none': direct)")
    return p


def main(argv, default_key_file, known_servers_name):
    args = parser(default_key_file).parse_args(argv)
    try:
        invite = invitecode.decode(args.code)
    except invitecode.InvalidCode as exc:
        return _fail("not an enrolment code: %s" % exc)
    key_file = args.key_file.expanduser()
    try:
        key = _key(key_file)
        pins = known_servers.KnownServers(key_file.parent / known_servers_name)
        pinned = _check_pin(pins, invite)
    except (crypto.KeyFileError, known_servers.TrustError, OSError) as exc:
        return _fail(exc)
    gateways = invitecode.gateways_of(invite.gateways)  # checked by decode()
    try:
        for gateway in gateways:  # a bad proxy URL (flag or environment) is a usage error
            proxies.choose(gateway, args.proxy)
    except proxies.ProxyUrlError as exc:
        return _fail(exc)
    enrolling = agent.Agent(gateways, invite.subdomain, key, invite.server_key, None,
                            proxy=args.proxy,
                            extra_config={"enroll": {"invite": invite.invite_id,
                                                     "secret": invite.secret}})
    try:
        info = enrolling.enroll_once()
    except agent.Fatal as exc:
        return _fail(exc, exc.exit_code)
    except (agent.Retry, OSError, gevent.Timeout, agent.ProtocolError) as exc:
        return _fail("cannot enrol at %s: %s" % (invite.gateways, exc or type(exc).__name__), 1)
    if not pinned:  # only a server that proved the key and took the code gets pinned
        pins.add(invite.gateways, invite.server_key)
    remember(key_file.parent / ENROLLED_NAME, invite.subdomain, invite.gateways)
    print("enrolled %s with key %s; run: diglett -n %s BACKEND"
          % (info.get("host") or invite.subdomain, crypto.fingerprint(crypto.public_hex(key)),
             invite.subdomain))
    return 0


def _key(path):
    """The agent key at ``path``, made (and announced) when there is none yet."""
    if path.exists():
        return crypto.read_private_key(path)
    key = crypto.generate_private_key()
    crypto.write_private_key(path, key)
    print("made a new agent key in %s" % path, file=sys.stderr)
    return key


def _check_pin(pins, invite):
    """True when the code's server key is pinned for its gateways already; a different key
    pinned there wins (TrustError)."""
    found = pins.lookup(invite.gateways)
    if found is None:
        return False
    if found[0] != invite.server_key:
        raise known_servers.TrustError(
            "%s:%d pins another key for %s than this code (%s): a code from another server, "
            "or a tampered one; remove that line if the server's key really changed"
            % (pins.path, found[1], invite.gateways, crypto.fingerprint(invite.server_key)))
    return True


def remember(path, name, gateways):
    """Record (or replace) the gateway of ``name`` in the enrolled file."""
    lines = [line for line in _lines(path) if line.split()[:1] != [name]]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text("".join(line + "\n" for line in lines + ["%s %s" % (name, gateways)]))


def gateway_of(path, name):
    """The gateways `diglett enroll` recorded for ``name``, or None."""
    for line in _lines(path):
        fields = line.split()
        if len(fields) == 2 and fields[0] == name:
            return fields[1]
    return None


def _lines(path):
    try:
        return [line for line in Path(path).read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _fail(message, code=agent.EXIT_USAGE):
    print("diglett: error: %s" % message, file=sys.stderr)
    return code
