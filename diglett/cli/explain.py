"""``diglett-admin status NAME``: one name end to end, from every place that knows about it.

The registry gives the grants, the session row, the hook outbox and the audit trail; the
running server's HTTP API gives live traffic; each enabled hook's ``describe()`` says what it
has published for the name (the Traefik hook: the route Traefik serves now; the etcd hook: the
owner and route keys), so this module knows no ingress. What cannot be reached is reported as
such, never as an error of the whole command.
"""

import ipaddress
import json
import urllib.error
import urllib.request

from diglett import crypto, hookapi, hookloader
from diglett.policy import Policy
from diglett.registry import LEGACY_GATEWAY, iso_time
from diglett.workers import served_here

HTTP_TIMEOUT = 2  # seconds for each of the server's and Traefik's APIs
AUDIT_LINES = 10  # latest audit entries shown


def status(name, cfg, registry):
    session = next((row for row in registry.active_sessions() if row.subdomain == name), None)
    return {
        "name": name,
        "host": "%s.%s" % (name, cfg.domain),
        "grants": [grant.to_json() for grant in registry.grants() if grant.subdomain == name],
        "session": _session(session, cfg),
        "hooks": _hooks(name, registry),
        "published": _published(name, cfg),
        "audit": [entry.to_json()
                  for entry in registry.audit_entries(subdomain=name, limit=AUDIT_LINES)],
    }


def _session(row, cfg):
    if row is None:
        return None
    data = row.to_json()
    if row.gateway != LEGACY_GATEWAY and not served_here(row.gateway, cfg.gateway_id):
        # our server's API knows nothing of it
        data["live"] = "held by gateway %s; run status there for its traffic" % row.gateway
        return data
    live = _get_json(_server_url(cfg, "/api/tunnels"), _auth(cfg))
    if isinstance(live, list):
        mine = next((t for t in live if t.get("id") == row.id), None)
        for key in ("bytes_in", "bytes_out", "streams_open", "streams_opened"):
            if mine and key in mine:
                data[key] = mine[key]
    else:
        data["live"] = live.get("error") if isinstance(live, dict) else "unavailable"
    return data


def _hooks(name, registry):
    """The latest delivery of each hook for ``name``."""
    latest = {}
    for delivery in registry.deliveries(limit=5000):
        if delivery.subdomain == name and delivery.hook not in latest:
            latest[delivery.hook] = {
                "event": delivery.kind, "state": delivery.state, "attempts": delivery.attempts,
                "last_error": delivery.last_error, "queued": iso_time(delivery.created),
            }
    return latest


def _published(name, cfg):
    """{hook: what it has published for ``name``} of every enabled hook that can say."""
    context = hookapi.HookContext(cfg.domain, config_dir=str(cfg.path.parent),
                                     gateway_id=cfg.gateway_id)
    published = {}
    for hook_name, hook in hookloader.build(cfg, context):
        try:
            found = hook.describe(name)
        except Exception as exc:  # a hook's lookup failing is part of the answer
            found = {"route": None, "detail": "%s: %s" % (type(exc).__name__, exc)}
        if found is not None:
            published[hook_name] = found
    return published


def _server_url(cfg, path):
    host, port = cfg.http
    if ipaddress.ip_address(host).is_unspecified:  # listening everywhere: ask loopback
        host = "::1" if ":" in host else "127.0.0.1"
    return "http://%s:%d%s" % ("[%s]" % host if ":" in host else host, port, path)


def _auth(cfg):
    return {"Authorization": "Bearer " + cfg.token} if cfg.token else {}


def _get_json(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as answer:
            return json.loads(answer.read(1 << 20))
    except urllib.error.HTTPError as exc:
        return {"error": "%s answered %d" % (url, exc.code)}
    except (OSError, ValueError) as exc:
        return {"error": "%s: %s" % (url, getattr(exc, "reason", exc))}


def print_status(report):
    print("%s (%s)" % (report["name"], report["host"]))
    print("\ngrants:")
    for grant in report["grants"] or [None]:
        print("  (none: no key may serve this name)" if grant is None else
              "  key %s  port %s  %s  %s%s" % (grant["fingerprint"], grant["port"] or "-",
                                               grant["created"], grant["comment"],
                                               _policy_line(grant)))
    session = report["session"]
    print("\nsession:")
    if session is None:
        print("  not connected")
    else:
        print("  %s since %s, tunnel port %s:%s, agent %s from %s%s"
              % (session["id"], session["started"], session["host"], session["port"],
                 crypto.fingerprint(session["key"]), session["remote"],
                 ", gateway %s" % session["gateway"] if session.get("gateway") else ""))
        if "bytes_in" in session:
            print("  traffic: %s bytes in, %s bytes out, %s streams open, %s opened"
                  % (session["bytes_in"], session["bytes_out"], session.get("streams_open"),
                     session.get("streams_opened")))
        else:
            print("  live traffic: %s" % session.get("live", "unavailable"))
    print("\nhooks:")
    for hook, last in sorted(report["hooks"].items()) or [(None, None)]:
        print("  (no deliveries)" if hook is None else
              "  %-8s last %s: %s after %d attempts (queued %s)%s"
              % (hook, last["event"], last["state"], last["attempts"], last["queued"],
                 "; error: " + last["last_error"] if last["last_error"] else ""))
    for hook, found in sorted(report["published"].items()):
        print("\npublished by %s:" % hook)
        _print_published(found)
    print("\naudit (latest first):")
    for entry in report["audit"] or [None]:
        print("  (none)" if entry is None else
              "  %s  %-14s %s  %s" % (entry["time"][:19], entry["action"], entry["actor"],
                                      entry["detail"]))


def _print_published(found):
    if found.get("route") is None:
        print("  no route (%s)" % found.get("detail", "none published"))
    elif "servers" in found:  # the Traefik REST hook's form
        print("  %s -> %s (%s)%s" % (found["route"], ", ".join(found["servers"]),
                                     found["status"], "; errors: " + "; ".join(
                                         found["errors"]) if found["errors"] else ""))
    else:
        print("  %s" % found["route"])
    for key, value in sorted(found.items()):
        if key not in ("route", "servers", "status", "errors", "entrypoints", "detail"):
            print("  %s: %s" % (key, json.dumps(value, sort_keys=True)))


def _policy_line(grant):
    """The grant's policy as `grants` shows it, on its own line; nothing without one."""
    summary = Policy.from_json(grant.get("policy") or {}).summary()
    return "" if summary == "-" else "\n    policy: %s" % summary
