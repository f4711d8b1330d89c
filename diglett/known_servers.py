"""Which server key the agent trusts: --server-key, or a key pinned on first use.

Owns the known-servers file (one ``GATEWAY KEYHEX`` line per server, like ssh's
known_hosts) and the one-time fetch of the server's /info. There is deliberately no
"accept any key" mode.
"""

import json
import os
import urllib.request
from pathlib import Path

from diglett import crypto

INFO_TIMEOUT = 10  # seconds for the one-time /info fetch
INFO_MAX_SIZE = 64 * 1024  # an /info answer is small; refuse anything bigger


class TrustError(Exception):
    """No usable server key; the message says what to do."""


class KnownServers:
    def __init__(self, path):
        self.path = Path(path)

    def lookup(self, gateway):
        """-> (key hex, line number) for ``gateway``, or None."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TrustError("cannot read %s: %s" % (self.path, exc.strerror)) from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if len(fields) >= 2 and not fields[0].startswith("#") and fields[0] == gateway:
                try:
                    return crypto.normalize_public_key(fields[1]), number
                except crypto.KeyFormatError as exc:
                    raise TrustError("%s:%d: %s; fix or delete that line"
                                     % (self.path, number, exc)) from None
        return None

    def add(self, gateway, key_hex):
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write("%s %s\n" % (gateway, key_hex))


def fetch_info_key(url):
    """The server key announced by /info (ideally over HTTPS through the gateway's proxy)."""
    try:
        with urllib.request.urlopen(url, timeout=INFO_TIMEOUT) as answer:
            info = json.loads(answer.read(INFO_MAX_SIZE + 1)[:INFO_MAX_SIZE])
        return crypto.normalize_public_key(info["key"])
    except (OSError, ValueError, KeyError, TypeError, crypto.KeyFormatError) as exc:
        raise TrustError("cannot get the server key from %s: %s" % (url, exc)) from None


def resolve(gateway, server_key=None, info_url=None, known_servers=None, notify=print):
    """The key to pin and how it was learned: (key hex, source text for error messages)."""
    if server_key:
        try:
            return crypto.normalize_public_key(server_key), "--server-key"
        except crypto.KeyFormatError as exc:
            raise TrustError("--server-key: %s" % exc) from None
    known = KnownServers(known_servers) if known_servers else None
    entry = known.lookup(gateway) if known else None
    if entry is not None:
        return entry[0], "%s:%d" % (known.path, entry[1])
    if info_url and known:
        key = fetch_info_key(info_url)
        known.add(gateway, key)
        notify("pinned server key %s for %s in %s" % (key, gateway, known.path))
        return key, "%s (pinned from %s)" % (known.path, info_url)
    raise TrustError(
        "no server key for %s: pass --server-key HEX (the \"key\" of the server's /info, or "
        "the output of `diglett-admin info` on the server), or --info-url URL of its /info "
        "to pin the key on first use" % gateway)


def mismatch_message(gateway, pinned, source, info_url=None):
    """Name both keys and the place to edit, like ssh's "Offending key" warning."""
    message = "server key mismatch at %s: pinned key %s (from %s)" % (gateway, pinned, source)
    if info_url:
        try:
            message += " but the server announces %s" % fetch_info_key(info_url)
        except TrustError:
            pass
    return message + ("; this may be a man in the middle. If the server's key really changed, "
                      "update %s" % source)
