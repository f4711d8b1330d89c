"""The server's HTTP listener: /info, /healthz, /metrics, /api/tunnels, the status page at /,
and the grants and invites API (/api/grants, /api/invites: diglett.httpwrite).

A small WSGI app over the running Server; besides the grants and invites API it only reads
the server's state. /info is public by
design (it tells agents the server key to pin) and so is /healthz. Everything else shows the
tunnel inventory, so who may see it depends on the bind (``[server] http``): on a loopback
address everything is served without a token; on any other address (0.0.0.0 and :: included:
they listen on every interface) the rest needs ``Authorization: Bearer <token>``, and without a
configured token it is not served at all (404).
"""

import hmac
import ipaddress
import json
import logging
import resource

import gevent.pool
from gevent.pywsgi import WSGIServer

from diglett import __version__, httpwrite, metrics, statusgrants, statuspage, wire
from diglett.registry import RegistryError

log = logging.getLogger(__name__)

PUBLIC = frozenset({"/info", "/healthz"})  # served on every bind, without a token
HTTP_CONNECTIONS = 512  # served at once at most; more wait in the kernel's backlog
HTTP_FD_SHARE = 4  # ... and at most a quarter of the process's file descriptor limit
HTTP_TIMEOUT = 10  # seconds a client may stay silent while sending or reading (slowloris)


class _BoundedServer(WSGIServer):
    def handle(self, sock, address):
        sock.settimeout(HTTP_TIMEOUT)
        super().handle(sock, address)


def make_server(address, app):
    """The HTTP listener: a bounded pool and a timeout per connection, so slow clients hold
    a bounded share of the descriptors, each for HTTP_TIMEOUT seconds of silence at most,
    never the descriptors agents and tunnel clients need."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    size = HTTP_CONNECTIONS
    if soft_limit != resource.RLIM_INFINITY:
        size = max(8, min(size, soft_limit // HTTP_FD_SHARE))
    return _BoundedServer(address, app, log=None, error_log=log, spawn=gevent.pool.Pool(size))


def is_loopback(host):
    """127.0.0.0/8, ::1 and localhost; the unspecified 0.0.0.0 and :: are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def tunnels(server):
    """The active sessions as `diglett-admin sessions --json` shows them, with traffic."""
    return [snapshot.to_json() for _, snapshot in sorted(server.snapshots().items())]


def make_app(server, hooks=None, metrics_registry=None):
    """``metrics_registry``: what /metrics renders (a master's sums), else the server's own."""
    registry = metrics_registry or metrics.make_registry(server, hooks)
    token = server.config.token
    open_bind = is_loopback(server.config.http[0])
    if not open_bind and not token:
        log.warning("http=%s:%d is not loopback and [server] token is empty: only /info and "
                    "/healthz are served there", *server.config.http)

    def info():
        return _json(200, {
            "version": __version__,
            "key": server.public_key,
            "keys": [server.public_key],
            "wire": [wire.WIRE_VERSION],
            "domain": server.config.domain,
            "agent_port": server.agent_port,
        })

    def healthz():
        failing = server.db.failing
        body = {"status": "ok" if failing is None else "degraded", "agents": len(server.sessions)}
        if failing is not None:
            body["registry"] = failing
        return _json(200, body)

    routes = {
        "/info": info,
        "/healthz": healthz,
        "/debug/stats": lambda: _json(200, server.stats()),
        "/metrics": lambda: (200, metrics.CONTENT_TYPE, metrics.render(registry)),
        "/api/tunnels": lambda: _json(200, tunnels(server)),
        "/": lambda: (200, "text/html; charset=utf-8", statuspage.render(
            server, tunnels(server), extra=statusgrants.render(grants(server))).encode()),
    }

    def access(environ):
        """None when the request may be served, else the refusal (status, content type, body)."""
        if open_bind or environ.get("PATH_INFO") in PUBLIC:
            return None
        if not token:  # nothing beyond /info and /healthz exists here
            return _json(404, {"error": "not found"})
        given = environ.get("HTTP_AUTHORIZATION", "")
        if hmac.compare_digest(given.encode(), ("Bearer " + token).encode()):
            return None
        return _json(401, {"error": "missing or wrong bearer token"})

    def _write_refusal(environ):
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return None
        refusal = httpwrite.write_refusal(environ, open_bind)
        return None if refusal is None else _json(refusal[0], {"error": refusal[1]})

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        handler = routes.get(path)
        if httpwrite.handles(path):  # grants and invites: read and write, same token rule
            answer = access(environ) or _write_refusal(environ)
            handler = lambda: _json(*httpwrite.handle(server, environ))  # noqa: E731
        elif environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            answer = _json(405, {"error": "method not allowed"})
        else:
            answer = access(environ)
        if answer is None:
            answer = _json(404, {"error": "not found"}) if handler is None else handler()
        status, content_type, payload = answer
        headers = [("Content-Type", content_type), ("Content-Length", str(len(payload))),
                   ("Cache-Control", "no-store")]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="diglett"'))
        start_response("%d %s" % (status, _REASONS[status]), headers)
        return [payload]

    return app


def grants(server):
    """The grants for the status page; none (and a note) when the registry cannot answer."""
    try:
        return [grant.to_json() for grant in server.db.call(server.registry.grants)]
    except RegistryError as exc:
        log.warning("status page: cannot read the grants: %s", exc)
        return None


def _json(status, body):
    return status, "application/json", (json.dumps(body, indent=1) + "\n").encode()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 415: "Unsupported Media Type"}
