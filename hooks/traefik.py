"""[hook:traefik]: keep Traefik's REST provider in step with the active sessions.

Traefik's REST provider takes the whole dynamic configuration at once and forgets it when
Traefik restarts, so this hook never sends differences: it mirrors the state
(``mirrors_state``), so the dispatcher calls ``sync`` once for every event pending, which
renders all active sessions and PUTs them, then reads Traefik's routers back (a malformed
rule is refused although the PUT answers 200) once Traefik serves the PUT's anchor (its
overview's router counts first; the whole list only when they show an error). Every
``check_interval`` seconds it checks from the anchor alone that Traefik still serves the last
PUT, every FULL_CHECK_EVERY checks it compares all of Traefik's routers with the sessions, and
it pushes again when they differ (Traefik restarted).
"""

import collections
import json
import logging
import time
import urllib.error
import urllib.request
import uuid

import gevent
import gevent.lock

from diglett.hookapi import Hook

log = logging.getLogger(__name__)

ROUTER_PREFIX = "diglett-"  # routers and services are named diglett-NAME
RESPONSE_LIMIT = 1 << 20  # bytes read from Traefik's API answers
SETTLE_POLL = 0.2  # seconds between reads of the anchor until Traefik applied a PUT, and ...
SETTLE_POLL_MAX = 1.0  # ... then of its routers, doubling up to this, while the change settles
PAGE_SIZE = 1000  # routers per read of Traefik's API (its default page holds only 100)
FULL_CHECK_EVERY = 12  # every 12th check compares all routers with the sessions
# Every PUT carries a marker: an (unused) middleware whose header names the PUT. Reading it
# back tells in one small request that Traefik applied that PUT, or that it restarted and
# forgot it (the router list of thousands of agents is read once per change, not polled).
ANCHOR = "diglett-anchor"
ANCHOR_HEADER = "X-Diglett-Generation"
MODES = ("http", "tcp")
# A grant's own middlewares are named PREFIX + NAME: no prefix is a prefix of another, so no
# two names (nor a router's name) ever produce the same middleware name.
ALLOW_PREFIX = "diglett-allow-"  # ipAllowList
FORWARD_AUTH_PREFIX = "diglett-fwd-"  # forwardAuth
BASIC_AUTH_PREFIX = "diglett-auth-"  # basicAuth
MIDDLEWARE_PREFIXES = (ALLOW_PREFIX, FORWARD_AUTH_PREFIX, BASIC_AUTH_PREFIX)


class TraefikFailed(Exception):
    pass


# The options that shape a route, shared by both Traefik hooks (REST here, etcd in traefik_etcd).
ROUTE_OPTIONS = {
    "upstream_host": ("string", "", "host Traefik uses to reach tunnel ports "
                                    "(default: the server's bind address)"),
    "entrypoints": ("list", "", "Traefik entrypoints of the routers (default: all)"),
    "cert_resolver": ("string", "", "certificate resolver: routers get TLS with it"),
    "middlewares": ("list", "", "middlewares added to every http router, before the "
                                "grant's own (diglett-admin grant --basic-auth ...)"),
    "mode": ("string", "http", "http (Host rule) or tcp (HostSNI, TLS passthrough); a grant's "
                               "--mode overrides it"),
    "reuse_connections": ("boolean", "yes", "Traefik reuses its connections to tunnel ports "
                                            "(no: one per request, so restarts cut none)"),
}


class PolicyNotApplicable(Exception):
    """A grant's policy that this route cannot carry; the route is not published at all."""


# What a session becomes in Traefik: its mode, its router and service (both named
# diglett-NAME) and its own middlewares ({name: definition}), in dynamic-configuration form.
Route = collections.namedtuple("Route", "mode name router service middlewares transports")
# reuse_connections = no: an HTTP route's own serversTransport, which keeps no idle connection. A
# TCP proxy cannot tell a pooled connection between two requests from a busy one, so a
# draining agent or server can only cut it, maybe under a request; without the pool every
# stream ends with its response and a drain takes a moment (docs/operations.md).
NO_POOL = {"maxIdleConnsPerHost": -1}


class Routes:
    """Routes from the ROUTE_OPTIONS and each grant's policy (``event.policy``, checked by the
    server with diglett.policy before it reached an event)."""

    def __init__(self, options, domain=""):
        self.mode = options["mode"]
        if self.mode not in MODES:
            raise ValueError("mode must be http or tcp, got %r" % self.mode)
        self.upstream_host = options["upstream_host"]
        self.entrypoints = list(options["entrypoints"])
        self.cert_resolver = options["cert_resolver"]
        self.middlewares = list(options["middlewares"])
        self.reuse = options.get("reuse_connections", True)
        self.domain = (domain or "").lower()

    def mode_of(self, event):
        return (event.policy or {}).get("mode") or self.mode

    def render(self, event):
        """The Route of one session's connect (or update) event; PolicyNotApplicable when
        its policy needs HTTP but the route is TCP (never published without its auth)."""
        policy = event.policy or {}
        mode = self.mode_of(event)
        name = ROUTER_PREFIX + event.subdomain
        host = _bracketed(self.upstream_host or event.listen_host)
        router = {"service": name}
        if self.entrypoints:
            router["entryPoints"] = self.entrypoints
        hosts = [event.host] + self._aliases(policy)
        if mode == "tcp":
            return self._tcp(event, policy, name, router, hosts, host)
        router["rule"] = " || ".join("Host(`%s`)" % h for h in hosts)
        middlewares = _http_middlewares(event.subdomain, policy)
        chain = self.middlewares + list(middlewares) + list(policy.get("middlewares", ()))
        if chain:
            router["middlewares"] = chain
        if self.cert_resolver:  # every Host of the rule gets its certificate
            router["tls"] = {"certResolver": self.cert_resolver}
        service = {"loadBalancer": {"servers": [
            {"url": "http://%s:%d" % (host, event.listen_port)}]}}
        transports = {}
        if not self.reuse:
            transports[name] = dict(NO_POOL)
            service["loadBalancer"]["serversTransport"] = name
        return Route(mode, name, router, service, middlewares, transports)

    def _tcp(self, event, policy, name, router, hosts, host):
        needs_http = [option for option in ("basic_auth", "forward_auth", "middlewares")
                      if policy.get(option)]
        if needs_http:
            raise PolicyNotApplicable(
                "%s: the grant asks for %s but the route is tcp (TLS passthrough); set the "
                "grant's mode to http" % (event.subdomain, ", ".join(needs_http)))
        router["rule"] = " || ".join("HostSNI(`%s`)" % h for h in hosts)
        router["tls"] = {"passthrough": True}
        middlewares = {}
        if policy.get("allow"):
            middlewares[ALLOW_PREFIX + event.subdomain] = {
                "ipAllowList": {"sourceRange": list(policy["allow"])}}
            router["middlewares"] = list(middlewares)
        service = {"loadBalancer": {"servers": [
            {"address": "%s:%d" % (host, event.listen_port)}]}}
        return Route("tcp", name, router, service, middlewares, {})

    def _aliases(self, policy):
        """The grant's aliases, never one inside the tunnel domain (diglett-admin refuses
        those; a hand-edited row must not take another name's host either)."""
        return [alias for alias in policy.get("aliases", ())
                if not (self.domain and (alias == self.domain
                                         or alias.endswith("." + self.domain)))]


def _http_middlewares(subdomain, policy):
    """{name: definition} of the grant's own HTTP middlewares, in the order they run: the
    allow list refuses cheapest, forward auth then basic auth ask for credentials."""
    middlewares = {}
    if policy.get("allow"):
        middlewares[ALLOW_PREFIX + subdomain] = {
            "ipAllowList": {"sourceRange": list(policy["allow"])}}
    if policy.get("forward_auth"):
        middlewares[FORWARD_AUTH_PREFIX + subdomain] = {
            "forwardAuth": {"address": policy["forward_auth"]}}
    if policy.get("basic_auth"):
        middlewares[BASIC_AUTH_PREFIX + subdomain] = {
            "basicAuth": {"users": list(policy["basic_auth"])}}
    return middlewares


class TraefikHook(Hook):
    # Traefik mirrors the active sessions: a connect whose disconnect is queued changes nothing,
    # and one PUT of the whole state settles any number of events.
    skip_ended_connects = True
    mirrors_state = True
    OPTIONS = {
        "api": ("string", None, "Traefik API base URL, e.g. http://127.0.0.1:8080"),
        **ROUTE_OPTIONS,
        "check_interval": ("seconds", "5", "seconds between checks that Traefik has the routes"),
        "settle": ("seconds", "5", "seconds Traefik may take to apply a change (its "
                                   "providersThrottleDuration is 2 s by default)"),
        "timeout": ("seconds", "10", "seconds for one call to Traefik's API"),
    }

    def __init__(self, options, context):
        super().__init__(options, context)
        self.api = options["api"].rstrip("/")
        if not self.api.startswith(("http://", "https://")):
            raise ValueError("api must be an http:// or https:// URL, got %r" % self.api)
        self.routes = Routes(options, getattr(context, "domain", ""))
        self.mode = self.routes.mode
        self.check_interval = options["check_interval"]
        self.timeout = options["timeout"]
        self.settle = options["settle"]
        self._checker = None
        self._lock = gevent.lock.Semaphore()  # one sync at a time: a PUT never goes back in time
        self._published = None  # {mode: router names} of the last PUT Traefik answered
        self._checks = 0
        self._token = uuid.uuid4().hex[:12]  # this run's PUTs, told from another run's
        self._generation = 0  # PUTs so far; the anchor of each names it
        self._confirmed = 0  # the newest generation Traefik was seen serving

    # ----- hook interface -------------------------------------------------------------
    def start(self):
        self._checker = gevent.spawn(self._check_loop)

    def stop(self):
        if self._checker is not None:
            self._checker.kill()

    def session_started(self, event):
        self.sync()

    def session_ended(self, event):
        self.sync()

    def session_updated(self, event):
        self.sync()  # the grant's policy changed: the whole configuration is rendered again

    def describe(self, name):
        """The router and service Traefik serves for ``name`` now, read from its API."""
        modes = [self.mode] + [mode for mode in MODES if mode != self.mode]
        for mode in modes:  # a grant's --mode may differ from the hook's
            base = "/api/%s/" % mode
            try:
                router = self._call("GET", base + "routers/%s%s@rest" % (ROUTER_PREFIX, name))
                break
            except TraefikFailed as exc:
                if mode == modes[-1]:
                    return {"route": None, "detail": str(exc)}
        try:
            service = self._call("GET", base + "services/%s%s@rest" % (ROUTER_PREFIX, name))
        except TraefikFailed:
            service = None
        servers = (service or {}).get("loadBalancer", {}).get("servers", [])
        return {"route": router.get("rule"), "status": router.get("status"),
                "entrypoints": router.get("entryPoints"),
                "middlewares": router.get("middlewares") or [],
                "servers": [s.get("url") or s.get("address") for s in servers],
                "errors": router.get("error") or []}

    # ----- rendering --------------------------------------------------------------------
    def render(self, sessions):
        """The whole dynamic configuration for ``sessions`` (connect events of active ones).

        Empty maps are explicit: Traefik ignores a PUT of ``{}`` and would keep old routes.
        The hook's mode is always there; the other mode, and middlewares, only when used.
        A session whose policy cannot apply is left out (fail closed) and logged.
        """
        desired = {self.mode: {"routers": {}, "services": {}}}
        for event in sessions:
            try:
                route = self.routes.render(event)
            except PolicyNotApplicable as exc:
                log.error("hook=traefik subdomain=%s not published: %s", event.subdomain, exc)
                continue
            section = desired.setdefault(route.mode, {"routers": {}, "services": {}})
            section["routers"][route.name] = route.router
            section["services"][route.name] = route.service
            if route.middlewares:
                section.setdefault("middlewares", {}).update(route.middlewares)
            if route.transports:
                section.setdefault("serversTransports", {}).update(route.transports)
        return desired

    # ----- talking to Traefik -----------------------------------------------------------
    def sync(self, events=()):
        """Push the active sessions, then check that Traefik took every router. ``events``
        (the deliveries this call settles) change nothing: the state is rendered afresh."""
        with self._lock:  # rendered inside the lock, so the last PUT holds the latest state
            desired = self.render(self.context.active_sessions())
            self._generation += 1
            generation = self._generation
            self._call("PUT", "/api/providers/rest", self._anchored(desired, generation))
            self._published = {mode: set(section["routers"]) for mode, section in desired.items()}
        self._settle(desired, generation)

    def _anchored(self, desired, generation):
        """``desired`` plus the anchor naming this PUT (a copy: ``desired`` stays routes only)."""
        body = {mode: dict(section) for mode, section in desired.items()}
        http = body.setdefault("http", {"routers": {}, "services": {}})
        http["middlewares"] = dict(http.get("middlewares", {}), **{ANCHOR: {"headers": {
            "customResponseHeaders": {ANCHOR_HEADER: "%s.%d" % (self._token, generation)}}}})
        return body

    def _applied(self):
        """The generation of our last PUT that Traefik serves now; None when it serves none
        of this run's (restarted, or not applied yet after our first)."""
        try:
            anchor = self._call("GET", "/api/http/middlewares/%s@rest" % ANCHOR) or {}
        except TraefikFailed as exc:
            if " answered 404" in str(exc):
                return None
            raise
        mark = anchor.get("headers", {}).get("customResponseHeaders", {}).get(ANCHOR_HEADER, "")
        token, _, number = mark.partition(".")
        return int(number) if token == self._token and number.isdigit() else None

    def _settle(self, desired, generation):
        """Wait (up to ``settle`` s) until Traefik applied PUT ``generation``, then until it
        serves every router of ``desired``; raise TraefikFailed with what it refused."""
        deadline = time.monotonic() + self.settle
        pause = SETTLE_POLL
        refused = None  # None until Traefik serves this PUT
        while True:  # Traefik applies provider changes asynchronously
            applied = self._applied()
            if applied is not None:
                self._confirmed = max(self._confirmed, applied)
            if applied is not None and applied > generation:
                return  # a newer PUT replaced ours; that sync checks its own routers
            if applied == generation:
                if self._clean(desired):
                    return
                refused = self._refused(desired)
                if not refused:
                    return
            if time.monotonic() > deadline:
                break
            gevent.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            if refused is not None:  # the anchor is cheap to read; the router list is not
                pause = min(SETTLE_POLL_MAX, pause * 2)
        if refused is None:
            raise TraefikFailed("Traefik did not apply the configuration within %s s (settle)"
                                % self.settle)
        shown = refused[:20] + (["and %d more" % (len(refused) - 20)] if refused[20:] else [])
        raise TraefikFailed("Traefik refused %s" % "; ".join(shown))

    def _clean(self, desired):
        """Traefik, serving our PUT, counts no router in error and at least as many as we
        sent: nothing was refused. One small read (its overview); the list of every router is
        read only when this cannot tell."""
        try:
            overview = self._call("GET", "/api/overview") or {}
        except TraefikFailed:
            return False
        for mode, section in desired.items():
            counts = overview.get(mode, {}).get("routers", {})
            if counts.get("errors", 1) or counts.get("total", 0) < len(section["routers"]):
                return False
        return True

    def _refused(self, desired):
        """Routers Traefik does not serve as we sent them, with Traefik's reason."""
        problems = []
        for mode, section in desired.items():
            problems += self._refused_of(mode, set(section["routers"]))
        return problems

    def _refused_of(self, mode, wanted):
        problems = []
        seen = set()
        for router in self._routers(mode):
            name = router.get("name", "").rsplit("@", 1)[0]
            if not router.get("name", "").endswith("@rest") or name not in wanted:
                continue
            seen.add(name)
            if router.get("status") == "disabled":
                problems.append("%s: %s" % (name, "; ".join(router.get("error") or ["disabled"])))
        problems.extend("%s: missing" % name for name in sorted(wanted - seen))
        return problems

    def _routers(self, mode=None):
        """Every router Traefik serves in ``mode``, read page by page."""
        path = "/api/%s/routers?per_page=%d" % (mode or self.mode, PAGE_SIZE)
        routers, page = [], 1
        while True:
            batch, following = self._call("GET", "%s&page=%d" % (path, page), pages=True)
            routers += batch or []
            if len(batch or ()) < PAGE_SIZE or following <= page:
                return routers
            page = following

    def out_of_step(self, full=True):
        """True when Traefik's REST routers are not the ones the sessions call for. Not
        ``full`` (and once something was PUT): only whether Traefik still holds the last PUT,
        from its anchor."""
        if not full and self._published is not None:
            return self._lost_published()
        desired = self.render(self.context.active_sessions())
        for mode, section in desired.items():
            present = {r.get("name", "").rsplit("@", 1)[0] for r in self._routers(mode)
                       if r.get("name", "").endswith("@rest")}
            if present != set(section["routers"]):
                return True
        return False

    def _lost_published(self):
        """Whether Traefik no longer serves the last PUT (restarted: it forgot the REST
        configuration), read from its anchor alone."""
        applied = self._applied()
        return applied is None or applied < self._confirmed

    def _check_loop(self):
        failing = False
        while True:
            gevent.sleep(self.check_interval)
            self._checks += 1
            try:
                if self.out_of_step(full=self._checks % FULL_CHECK_EVERY == 0):
                    log.warning("hook=traefik Traefik's routes differ from the sessions "
                                "(restarted?); pushing them again")
                    self.sync()
                if failing:
                    log.info("hook=traefik Traefik is in step again")
                failing = False
            except Exception as exc:  # Traefik down: say so once, keep checking
                if not failing:
                    log.warning("hook=traefik check failed: %s", exc)
                failing = True

    def _call(self, method, path, body=None, pages=False):
        """Traefik's JSON answer to a GET (None for other methods); with ``pages``, also the
        number of the page after it (its X-Next-Page header; 1 after the last)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.api + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                text = answer.read(RESPONSE_LIMIT)
                following = int(answer.headers.get("X-Next-Page") or 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode("utf-8", "replace").strip()
            raise TraefikFailed("%s %s answered %d: %s" % (method, path, exc.code,
                                                           detail[:300])) from None
        except (urllib.error.URLError, OSError) as exc:
            raise TraefikFailed("%s %s%s: %s" % (method, self.api, path,
                                                 getattr(exc, "reason", exc))) from None
        value = json.loads(text) if text.strip() and method == "GET" else None
        return (value, following) if pages else value


def _bracketed(host):
    return "[%s]" % host if ":" in host else host


HOOK = TraefikHook
