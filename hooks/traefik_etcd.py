"""[hook:traefik-etcd]: publish routes in etcd for a fleet of Traefiks (its etcd provider).

Every gateway holds one etcd lease. A session's route is claimed in ONE transaction on that
lease: the owner key ``NAMESPACE/owner/NAME`` and all of the route's Traefik keys, guarded by
the owner key's revision, so at most one gateway owns a name at a time and Traefik never sees
a router without its service. When the owner key holds another session, the newer session
wins (the same rule as a takeover on one gateway): an older one never overwrites a newer one.
Releases are fenced the same way, so a gateway that lost a name cannot delete the new owner's
route. A dead gateway's routes vanish with its lease; a clean stop revokes it.

When the lease is lost (the gateway was paused or cut off from etcd longer than its TTL), a
new one is granted and every live session is claimed again; names another gateway took
meanwhile stay with it, and the shared registry ends the local session as replaced.

Key layout and the reasons for it (anchor, one transaction per route): docs/hooks.md.
"""

import json
import logging
import os
import socket
import time

import gevent
import gevent.event

from diglett import etcd
from diglett.hookapi import Hook
from diglett.hooks.traefik import (
    MIDDLEWARE_PREFIXES, MODES, ROUTE_OPTIONS, ROUTER_PREFIX, PolicyNotApplicable, Routes,
)

log = logging.getLogger(__name__)

ANCHOR = "http/middlewares/diglett-anchor/headers/customResponseHeaders/X-Diglett"
CLAIM_ATTEMPTS = 5  # compare-and-swap rounds before a claim gives up (and the outbox retries)
FULL_CHECK_EVERY = 12  # every 12th check reads every owner key; the others only the anchor


class TraefikEtcdHook(Hook):
    # The owner keys mirror the active sessions: a connect whose disconnect is queued is moot.
    skip_ended_connects = True
    OPTIONS = {
        "endpoints": ("list", None, "etcd client URLs, e.g. http://10.0.0.1:2379 (several: "
                                    "the next is tried when one does not answer)"),
        "root_key": ("string", "traefik", "Traefik's --providers.etcd.rootKey"),
        "namespace": ("string", "diglett", "etcd prefix of diglett's own keys (owners, "
                                           "gateways); never under root_key"),
        "lease_ttl": ("seconds", "10", "seconds a dead gateway's routes outlive it"),
        "keepalive": ("seconds", "3", "seconds between lease refreshes (at most lease_ttl/2)"),
        "check_interval": ("seconds", "5", "seconds between checks that etcd still has every "
                                           "owned route (etcd restored or wiped)"),
        **ROUTE_OPTIONS,
        "timeout": ("seconds", "5", "seconds for one call to etcd"),
        "ca_file": ("string", "", "CA that signed etcd's certificates (https endpoints; "
                                  "default: the system's CAs)"),
        "cert_file": ("string", "", "client certificate for etcd's --client-cert-auth"),
        "key_file": ("string", "", "its private key"),
    }

    def __init__(self, options, context):
        super().__init__(options, context)
        files = [_resolve(options[name], context) for name in ("ca_file", "cert_file",
                                                                "key_file")]
        self.client = etcd.Client(options["endpoints"], options["timeout"], *files)
        self.timeout = options["timeout"]
        self.root = options["root_key"].strip("/")
        self.namespace = options["namespace"].strip("/")
        if not self.root or not self.namespace:
            raise ValueError("root_key and namespace must not be empty")
        if self.namespace.startswith(self.root):  # Traefik would re-list on every claim
            raise ValueError("namespace %r must not start with root_key %r"
                             % (self.namespace, self.root))
        self.ttl = options["lease_ttl"]
        self.keepalive = options["keepalive"]
        if self.keepalive * 2 > self.ttl:
            raise ValueError("keepalive (%s s) must be at most half of lease_ttl (%s s), so "
                             "one lost refresh does not lose the lease"
                             % (self.keepalive, self.ttl))
        self.check_interval = options["check_interval"]
        self.routes = Routes(options, getattr(context, "domain", ""))
        self.gateway_id = getattr(context, "gateway_id", None) or socket.gethostname()
        self.lease = None
        self._lease_ready = gevent.event.Event()
        self._loop = None
        self.counts = {"claims_won": 0, "claims_lost": 0, "releases": 0, "lease_losses": 0}
        self._checks = 0
        self._revision = 0  # etcd's revision at the last check

    # ----- hook interface -------------------------------------------------------------------
    def start(self):
        self._loop = gevent.spawn(self._lease_loop)

    def stop(self):
        if self._loop is not None:
            self._loop.kill()
        lease, self.lease = self.lease, None
        self._lease_ready.clear()
        if lease is not None:
            try:  # every route of this gateway goes in one revision
                self.client.revoke(lease)
                log.info("hook=traefik-etcd revoked lease %x", lease)
            except etcd.EtcdError as exc:
                log.warning("hook=traefik-etcd could not revoke lease %x (its routes go when "
                            "it expires): %s", lease, exc)

    def session_started(self, event):
        self.claim(event)

    def session_ended(self, event):
        self.release(event)

    def session_updated(self, event):
        self.claim(event)  # the same session: it still owns the name, its keys are replaced

    def describe(self, name):
        """The owner of ``name`` and the route keys etcd holds for it now."""
        try:
            owner = self.client.range(self.owner_key(name))
            keys = {key.decode(): value.decode("utf-8", "replace")
                    for prefix in self.route_prefixes(name)
                    for key, value, _ in self.client.range(prefix, prefix=True)}
        except etcd.EtcdError as exc:
            return {"route": None, "detail": str(exc)}
        rule = next((value for key, value in keys.items() if key.endswith("/rule")), None)
        return {"route": rule, "owner": _parse_owner(owner[0][1]) if owner else None,
                "keys": keys}

    def metrics(self):
        """(name, kind, documentation, value) for /metrics."""
        return [
            ("diglett_etcd_lease_up", "gauge", "1 while this gateway holds its etcd lease",
             int(self.lease is not None)),
            ("diglett_etcd_lease_losses", "counter", "etcd leases lost (expired while cut off)",
             self.counts["lease_losses"]),
            ("diglett_etcd_claims_won", "counter", "route claims written to etcd",
             self.counts["claims_won"]),
            ("diglett_etcd_claims_lost", "counter", "route claims refused: a newer session "
                                                     "owns the name", self.counts["claims_lost"]),
            ("diglett_etcd_releases", "counter", "routes released in etcd",
             self.counts["releases"]),
        ]

    # ----- keys -----------------------------------------------------------------------------
    def owner_key(self, subdomain):
        return "%s/owner/%s" % (self.namespace, subdomain)

    def route_prefixes(self, subdomain):
        """Every prefix a route of ``subdomain`` may write, in either mode (a grant's --mode
        may change while it is live): router, service and the grant's own middlewares."""
        prefixes = []
        for mode in MODES:
            base = "%s/%s/" % (self.root, mode)
            prefixes += [base + "routers/%s%s/" % (ROUTER_PREFIX, subdomain),
                         base + "services/%s%s/" % (ROUTER_PREFIX, subdomain)]
            prefixes += [base + "middlewares/%s%s/" % (prefix, subdomain)
                         for prefix in MIDDLEWARE_PREFIXES]
            prefixes.append(base + "serversTransports/%s%s/" % (ROUTER_PREFIX, subdomain))
        return prefixes

    def route_keys(self, event):
        """{key: value} of one route: the REST hook's router, service and middlewares,
        flattened the way Traefik's KV providers read them (keys are case-insensitive, lists
        are indexed)."""
        route = self.routes.render(event)
        base = "%s/%s/" % (self.root, route.mode)
        keys = {}
        _flatten(base + "routers/" + route.name, route.router, keys)
        _flatten(base + "services/" + route.name, route.service, keys)
        for name, definition in route.middlewares.items():
            _flatten(base + "middlewares/" + name, definition, keys)
        for name, definition in route.transports.items():
            _flatten(base + "serversTransports/" + name, definition, keys)
        return keys

    def stale_keys(self, event, wanted):
        """Keys of ``event``'s name in etcd that its route no longer has (a policy change:
        basic auth dropped, mode switched): deleted in the claim's transaction, one by one
        (etcd refuses a range delete that overlaps a put of the same transaction)."""
        present = {key.decode() for prefix in self.route_prefixes(event.subdomain)
                   for key, _, _ in self.client.range(prefix, prefix=True)}
        return sorted(present - set(wanted))

    def owner_value(self, event):
        return json.dumps({"gateway": self.gateway_id, "session": event.session_id,
                           "started": _started(event)}, sort_keys=True)

    # ----- claim and release --------------------------------------------------------------
    def claim(self, event):
        """Own ``event``'s name and publish its route; False when a newer session owns it."""
        lease = self._wait_lease()
        key = self.owner_key(event.subdomain)
        mine = self.owner_value(event)
        try:
            route = self.route_keys(event)
        except PolicyNotApplicable as exc:  # fail closed: no route rather than one unguarded
            self.release(event)
            raise etcd.EtcdError("not published: %s" % exc) from None
        current = self.client.range(key)
        for _ in range(CLAIM_ATTEMPTS):
            # read after the owner key: a change of the route keys changes its revision too
            writes = [etcd.put(key, mine, lease)] + [
                etcd.put(k, v, lease) for k, v in route.items()] + [
                {"request_delete_range": {"key": etcd._b64(k)}}
                for k in self.stale_keys(event, route)]
            revision = 0
            if current:
                _, value, revision = current[0]
                other = _parse_owner(value)
                if other.get("session") != event.session_id and _newer(other, event):
                    self.counts["claims_lost"] += 1
                    log.info("hook=traefik-etcd %s stays with gateway %s: its session %s is "
                             "newer than %s", event.subdomain, other.get("gateway"),
                             other.get("session"), event.session_id)
                    return False
            won, ranges = self.client.txn([etcd.compare_mod_revision(key, revision)], writes,
                                          [etcd.get(key)])
            if won:
                self.counts["claims_won"] += 1
                return True
            current = ranges[0] if ranges else []  # someone wrote in between: look again
        raise etcd.EtcdError("claim of %s kept racing other gateways" % event.subdomain)

    def release(self, event):
        """Delete ``event``'s route if, and only if, its session still owns the name."""
        key = self.owner_key(event.subdomain)
        for _ in range(CLAIM_ATTEMPTS):
            current = self.client.range(key)
            if not current:
                return
            _, value, revision = current[0]
            if _parse_owner(value).get("session") != event.session_id:
                return  # fenced: the name belongs to a newer session now
            deletes = [{"request_delete_range": {"key": etcd._b64(key)}}] + [
                etcd.delete_prefix(prefix) for prefix in self.route_prefixes(event.subdomain)]
            won, _ = self.client.txn([etcd.compare_mod_revision(key, revision)], deletes)
            if won:
                self.counts["releases"] += 1
                return
        raise etcd.EtcdError("release of %s kept racing other gateways" % event.subdomain)

    # ----- the lease ------------------------------------------------------------------------
    def _wait_lease(self):
        if not self._lease_ready.wait(self.timeout):
            raise etcd.EtcdError("no etcd lease yet (etcd at %s unreachable?)"
                                 % ", ".join(self.client.endpoints))
        return self.lease

    def _lease_loop(self):
        failing = False
        last_ok = time.monotonic()
        next_check = 0.0
        while True:
            try:
                if self.lease is None:
                    self._new_lease()
                else:
                    self.client.keepalive(self.lease)
                last_ok = time.monotonic()
                if last_ok >= next_check:
                    self._check()
                    next_check = last_ok + self.check_interval
                if failing:
                    log.info("hook=traefik-etcd etcd answers again")
                failing = False
            except etcd.LeaseLost:
                self._lost("the lease expired (this gateway was paused or cut off)")
                continue
            except Exception as exc:  # etcd down, the registry busy, a bug: keep refreshing
                if not failing:
                    log.warning("hook=traefik-etcd %s", exc)
                failing = True
                if self.lease is not None and time.monotonic() - last_ok > self.ttl:
                    self._lost("etcd has not answered for longer than lease_ttl")
            gevent.sleep(self.keepalive)

    def _new_lease(self):
        self.client.put("%s/%s" % (self.root, ANCHOR), "1")  # permanent; see docs/hooks.md
        lease = self.client.grant(self.ttl)
        self.client.put("%s/gateways/%s" % (self.namespace, self.gateway_id),
                        json.dumps({"gateway": self.gateway_id, "started": time.time()}), lease)
        self.lease = lease
        self._lease_ready.set()
        log.info("hook=traefik-etcd gateway %s holds lease %x (ttl %s s)", self.gateway_id,
                 lease, self.ttl)
        self._reclaim(self._active())

    def _lost(self, why):
        self.counts["lease_losses"] += 1
        self.lease = None
        self._lease_ready.clear()
        log.warning("hook=traefik-etcd lost its lease: %s; claiming every route again", why)

    def _check(self):
        """Claim again what etcd lost (restored from an old backup, or wiped). Most checks
        only read the anchor and etcd's revision (one small request, whatever the number of
        agents): a wiped etcd lacks the anchor, a restored one went back in revision. Every
        FULL_CHECK_EVERY-th check reads every owner key."""
        self._checks += 1
        anchored, revision = self.client.revision("%s/%s" % (self.root, ANCHOR))
        intact = anchored and revision >= self._revision
        self._revision = revision
        if intact and self._checks % FULL_CHECK_EVERY != 1:
            return
        owned = {key.decode() for key, _, _ in self.client.range(
            "%s/owner/" % self.namespace, prefix=True)}
        missing = [event for event in self._active()
                   if self.owner_key(event.subdomain) not in owned]
        if missing:
            log.warning("hook=traefik-etcd etcd lacks %d route(s) of this gateway; "
                        "publishing them again", len(missing))
            self._reclaim(missing)

    def _reclaim(self, events):
        for event in events:
            try:
                self.claim(event)
            except etcd.EtcdError as exc:
                log.warning("hook=traefik-etcd claim of %s failed: %s", event.subdomain, exc)

    def _active(self):
        active = self.context.active_sessions
        return list(active()) if active is not None else []


def _flatten(prefix, value, keys):
    if isinstance(value, dict):
        for name, item in value.items():
            _flatten("%s/%s" % (prefix, name.lower()), item, keys)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten("%s/%d" % (prefix, index), item, keys)
    else:
        keys[prefix] = "true" if value is True else str(value)


def _resolve(text, context):
    """A file option: None when empty; relative to the config file's folder."""
    if not text:
        return None
    folder = getattr(context, "config_dir", None)
    return os.path.join(folder, os.path.expanduser(text)) if folder else os.path.expanduser(text)


def _parse_owner(value):
    try:
        owner = json.loads(value)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _newer(owner, event):
    """True when the session in ``owner`` started after ``event``'s (ties by session id)."""
    try:
        return (float(owner.get("started", 0)), str(owner.get("session"))) > (
            _started(event), event.session_id)
    except (TypeError, ValueError):
        return False


def _started(event):
    return event.started or event.time  # events queued before `started` existed


HOOK = TraefikEtcdHook
