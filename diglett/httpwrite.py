"""The write half of the HTTP API: grants and invites (GET, POST, DELETE under /api/).

This module owns what each request may change and how it answers: JSON in, JSON out, every
bad value a 400 naming it (the same checks as diglett-admin: diglett.policy, the registry),
every change in the audit trail with the actor ``http-api <client address>``. The access rule
(the token) is httpapi's and applies here unchanged; on top of it a write must come from the
same origin (a page elsewhere cannot make the operator's browser write, CSRF) and, on a
loopback bind served without a token, name a loopback host (DNS rebinding). It must not talk to
the database on the hub: every registry call goes through the server's database thread.
"""

import ipaddress
import json
import urllib.parse

from diglett import crypto, invitecode, names, policy
from diglett.registry import RegistryError

MAX_BODY = 64 * 1024  # bytes of one request body
POLICY_FIELDS = tuple(policy.OPTION_NAMES.values())


class HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def handles(path):
    return path in ("/api/grants", "/api/invites") or path.startswith(
        ("/api/grants/", "/api/invites/"))


def write_refusal(environ, open_bind):
    """None when a POST or DELETE may go ahead, else (status, message)."""
    host = environ.get("HTTP_HOST", "")
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and origin not in ("http://" + host, "https://" + host):
        return 403, "cross-origin write refused (Origin %s, Host %s)" % (origin[:100], host[:100])
    if open_bind and not _loopback_host(host):
        return 403, "writes on a tokenless loopback bind need a loopback Host, got %r" % host[:100]
    if environ.get("REQUEST_METHOD") == "POST" and not environ.get(
            "CONTENT_TYPE", "").startswith("application/json"):
        return 415, "send Content-Type: application/json"
    return None


def handle(server, environ):
    """(status, JSON-able body) for a request under /api/grants or /api/invites."""
    method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    actor = "http-api %s" % environ.get("REMOTE_ADDR", "?")
    try:
        if path == "/api/grants":
            if method == "GET":
                return 200, [g.to_json() for g in server.db.call(server.registry.grants)]
            if method == "POST":
                return 200, _post_grant(server, _body(environ), actor)
        elif path == "/api/invites":
            if method == "GET":
                return 200, [i.to_json() for i in server.db.call(server.registry.invites)]
            if method == "POST":
                return 200, _post_invite(server, _body(environ), actor)
        elif path.startswith("/api/grants/") and method == "DELETE":
            key = query.get("key", [None])[0]
            return _delete_grant(server, path[len("/api/grants/"):], key, actor)
        elif path.startswith("/api/invites/") and method == "DELETE":
            return _delete_invite(server, path[len("/api/invites/"):], actor)
        return 405, {"error": "method not allowed"}
    except HttpError as exc:
        return exc.status, {"error": str(exc)}
    except (policy.PolicyError, names.InvalidName, crypto.KeyFormatError) as exc:
        return 400, {"error": str(exc)}
    except RegistryError as exc:
        return 409, {"error": str(exc)}


def _body(environ):
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if length > MAX_BODY:
        raise HttpError(413, "request body larger than %d bytes" % MAX_BODY)
    try:
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        raise HttpError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body


def _changes(server, body):
    """({field: value}, [fields to clear]) from a body's "policy" and "clear"."""
    given = body.get("policy") or {}
    clear = body.get("clear") or []
    if not isinstance(given, dict) or not isinstance(clear, list):
        raise HttpError(400, '"policy" must be an object and "clear" a list')
    unknown = (set(given) | set(clear)) - set(POLICY_FIELDS)
    if unknown:
        raise HttpError(400, "unknown policy field(s): %s (known: %s)"
                        % (", ".join(sorted(map(str, unknown))), ", ".join(POLICY_FIELDS)))
    changes = {name: tuple(v) if isinstance(v, list) else v for name, v in given.items()}
    policy.check_outside(changes.get("aliases", ()), server.config.domain)
    return changes, clear


def _post_grant(server, body, actor):
    """Create or update a grant; only the fields given change (like diglett-admin grant)."""
    changes, clear = _changes(server, body)
    port = body.get("port")
    comment = body.get("comment", "")
    if not isinstance(comment, str):
        raise HttpError(400, '"comment" must be text')
    grant = server.db.call(lambda: server.registry.grant(
        body.get("subdomain"), body.get("key"), port=port, comment=comment, actor=actor,
        changes=changes, clear=clear))
    return grant.to_json()


def _post_invite(server, body, actor):
    changes, _ = _changes(server, body)
    gateways = body.get("gateway") or [server.address]
    if not isinstance(gateways, list):
        raise HttpError(400, '"gateway" must be a list of what agents dial (HOST:PORT, '
                        "tls://HOST, wss://HOST/PATH)")
    try:
        gateways = [invitecode.gateway_entry(g) for g in gateways]
    except ValueError as exc:
        raise HttpError(400, '"gateway": %s' % exc) from None
    row, secret = server.db.call(lambda: server.registry.create_invite(
        body.get("subdomain"), body.get("ttl", 3600), changes, port=body.get("port"),
        comment=str(body.get("comment", "")), actor=actor))
    code = invitecode.encode(invitecode.Invite(",".join(gateways), server.public_key,
                                               row.subdomain, row.id, secret))
    return {"code": code, "invite": row.to_json()}


def _delete_grant(server, name, key, actor):
    name = names.validate_subdomain(urllib.parse.unquote(name))
    removed = server.db.call(server.registry.revoke, name, key, actor)
    if not removed:
        return 404, {"error": "no grant of %s to revoke" % name}
    return 200, {"revoked": removed, "subdomain": name}


def _delete_invite(server, invite_id, actor):
    if not server.db.call(server.registry.delete_invite, invite_id.lower(), actor):
        return 404, {"error": "no invite %s" % invite_id[:40]}
    return 200, {"deleted": invite_id.lower()}


def _loopback_host(host):
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
