"""The server's HTTP listener: GET /info and GET /healthz (JSON).

A small WSGI app over the running Server; it only reads the server's state. /info is
public by design: it tells agents the server key to pin.
"""

import hmac
import json

from diglett import __version__, wire


def make_app(server):
    def info():
        return 200, {
            "version": __version__,
            "key": server.public_key,
            "keys": [server.public_key],
            "wire": [wire.WIRE_VERSION],
            "domain": server.config.domain,
            "agent_port": server.agent_port,
        }

    def healthz():
        failing = server.db.failing
        body = {"status": "ok" if failing is None else "degraded", "agents": len(server.sessions)}
        if failing is not None:
            body["registry"] = failing
        return 200, body

    def debug_stats():
        return 200, server.stats()

    routes = {"/info": info, "/healthz": healthz, "/debug/stats": debug_stats}
    public = {"/info", "/healthz"}
    token = server.config.token

    def authorized(environ):
        """Everything but /info and /healthz needs the token when one is configured."""
        if not token or environ.get("PATH_INFO") in public:
            return True
        given = environ.get("HTTP_AUTHORIZATION", "")
        return hmac.compare_digest(given.encode(), ("Bearer " + token).encode())

    def app(environ, start_response):
        handler = routes.get(environ.get("PATH_INFO", ""))
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            status, body = 405, {"error": "method not allowed"}
        elif not authorized(environ):
            status, body = 401, {"error": "missing or wrong bearer token"}
        elif handler is None:
            status, body = 404, {"error": "not found"}
        else:
            status, body = handler()
        payload = (json.dumps(body, indent=1) + "\n").encode()
        start_response("%d %s" % (status, _REASONS[status]), [
            ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return app


_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
