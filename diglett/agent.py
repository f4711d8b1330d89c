"""The agent: dials the server, proves its key, and connects every stream to the backend.

Owns the agent side of the handshake, the reaction to the server's answers (which are
permanent and which are worth a retry), the reconnect loop with jittered exponential
backoff, and dialling the backend per stream. Exit codes are a contract for systemd's
RestartPreventExitStatus=; see docs/operations.md.
"""

import functools
import logging
import random
import re
import sys
import time

import gevent
import gevent.event
from gevent import socket

from diglett import __version__, crypto, noise, protocol, proxyproto, wire
from diglett.reach import gateway_url, transport
from diglett.reach import proxy as proxies
from diglett.reasons import CloseReason
from diglett.sockets import enable_keepalive, recv_exact, set_nodelay
from diglett.tunnel import Tunnel
from diglett.wire import ErrorCode, ProtocolError, RejectCode

log = logging.getLogger(__name__)

EXIT_OK = 0  # stopped by Ctrl-C or SIGTERM
EXIT_USAGE = 2  # bad arguments, config file or key file
EXIT_UNAUTHORIZED = 3  # the key holds no grant for the name
EXIT_INVALID_NAME = 4  # the name is not a valid DNS label
EXIT_SERVER_KEY_MISMATCH = 5  # the server is not the one whose key is pinned
EXIT_REVOKED = 6  # the grant was revoked while connected
EXIT_REPLACED = 7  # another agent with the same key took the name over
EXIT_VERSION = 8  # the server does not speak this agent's wire version
EXIT_PROXY_REFUSED = 9  # the proxy refused the CONNECT (403, 407) or its SOCKS equivalent
# Answers about one gateway rather than about the agent: with several gateways the agent
# exits only when every one of them gave one.
PER_GATEWAY_EXITS = (EXIT_SERVER_KEY_MISMATCH, EXIT_VERSION, EXIT_PROXY_REFUSED)

CONNECT_TIMEOUT = 10  # seconds to reach the server
HANDSHAKE_TIMEOUT = 15  # seconds from connect to the server's OK
BACKEND_CONNECT_TIMEOUT = 10  # seconds to reach the backend for one stream
BACKOFF_BASE = 1.0  # first reconnect delay (seconds), then doubling
BACKOFF_CAP = 60.0  # longest reconnect delay
BACKOFF_RESET_AFTER = 60.0  # a session that lived this long starts the backoff over
KEEPALIVE_PING = 10  # seconds between pings unless the server announces another interval
# A server that answers BUSY is up and shedding handshakes (max_startups): retry within a few
# seconds, as the backoff's third round would, not after the minute a long outage built up.
BUSY_BACKOFF_ROUND = 2  # so a BUSY retry waits 2-4 s at most


class Fatal(Exception):
    """Retrying cannot fix this: the agent exits with ``exit_code``."""

    def __init__(self, exit_code, message):
        super().__init__(message)
        self.exit_code = exit_code


class Retry(Exception):
    """Transient: reconnect after the backoff, and not sooner than ``min_delay``."""

    def __init__(self, message, min_delay=0.0, at_once=False, busy=False):
        super().__init__(message)
        self.min_delay = min_delay
        self.at_once = at_once  # a clean end (a draining server): no backoff, no attempt
        self.busy = busy  # the server is up but shedding load: the backoff stays short


_REFUSALS = {  # server ERROR code -> exit code; anything else is retried
    ErrorCode.UNAUTHORIZED: EXIT_UNAUTHORIZED,
    ErrorCode.INVALID_NAME: EXIT_INVALID_NAME,
    ErrorCode.REVOKED: EXIT_REVOKED,
    ErrorCode.REPLACED: EXIT_REPLACED,
    ErrorCode.BAD_CONFIG: EXIT_USAGE,
}
_GOAWAY_FATAL = {ErrorCode.REVOKED: EXIT_REVOKED, ErrorCode.REPLACED: EXIT_REPLACED}
STOP_DRAIN = 5.0  # seconds open streams may finish after Ctrl-C or SIGTERM
DRAIN_POLL = 0.05  # seconds between looks at the streams left while draining
AT_ONCE_GAP = 10.0  # seconds between two reconnects without backoff after a clean GOAWAY
KICK_MIN_DELAY = 5.0  # a kicked agent waits at least this long (the server may say more)
_RETRY_AFTER = re.compile(r"retry-after=(\d+)")  # servers before the "retry-after" feature


def kick_delay(retry_after, reason=""):
    """How long a kicked agent waits: GOAWAY's retry_after field, or from a server without
    that feature ``retry-after=N`` in the reason; never less than the minimum."""
    if not retry_after:
        match = _RETRY_AFTER.search(reason)
        retry_after = float(match.group(1)) if match else 0.0
    return max(KICK_MIN_DELAY, float(retry_after))


def backoff_delay(attempt, base=BACKOFF_BASE, cap=BACKOFF_CAP, rng=random.uniform):
    """Exponential with jitter: in [d/2, d] for d = base * 2^attempt, capped."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return rng(ceiling / 2, ceiling)


class Agent:
    def __init__(self, gateway, name, key, server_key, backend, *, on_mismatch=None,
                 out=sys.stdout, backoff_cap=BACKOFF_CAP, proxy_protocol=False,
                 drain_timeout=STOP_DRAIN, extra_config=None, proxy=None, source_address=None):
        # A GatewayUrl or (host, port), or a list of them: a fleet. Each attempt after a
        # failure or a disconnect goes to the next address, so a dead gateway costs one attempt.
        gateways = [gateway] if isinstance(gateway, gateway_url.GatewayUrl) or isinstance(
            gateway[0], str) else list(gateway)
        self.gateways = [g if isinstance(g, gateway_url.GatewayUrl)
                         else gateway_url.GatewayUrl("tcp", *g) for g in gateways]
        self.proxy = proxy  # --proxy as given (None: the environment decides; "none": direct)
        self.source_address = source_address  # local IP to dial from (None: the kernel's)
        self.gateway = self.gateways[0]  # the one of the current or last attempt
        self._turn = 0
        self._resolved = set()  # tcp addresses from DNS: their name needed no proxy
        self.proxy_protocol = proxy_protocol  # write a PROXY v2 header to every backend socket
        self.name = name
        self.key = key
        self.server_key = bytes.fromhex(server_key)
        self.backend = backend  # (host, port)
        self.on_mismatch = on_mismatch or (lambda: "the server's key is not the pinned one")
        self.out = out
        self.backoff_cap = backoff_cap
        self.drain_timeout = drain_timeout  # seconds open streams may finish after a stop
        self.extra_config = dict(extra_config or {})  # more CONFIG fields (enroll: §9.5)
        self.tunnel = None
        self._handshaking = None  # the socket of a handshake in progress, for stop()
        self._stopping = gevent.event.Event()
        self._goaway = None

    def stop(self):
        """Ctrl-C / SIGTERM: tell the server (GOAWAY NO_ERROR: it opens no new stream, and
        holds new visitors for this name's next session), let open streams finish for up to
        ``drain_timeout`` seconds, then close and exit 0. A second stop closes at once."""
        first = not self._stopping.is_set()
        self._stopping.set()
        tunnel = self.tunnel
        if tunnel is not None:
            if first and tunnel.pumps and self.drain_timeout > 0:
                log.warning("subdomain=%s stopping: %d open streams get up to %g s to finish",
                            self.name, len(tunnel.pumps), self.drain_timeout)
                tunnel.session.goaway(ErrorCode.NO_ERROR, "agent stopping")
                tunnel.wake()
                gevent.spawn(self._close_when_drained, tunnel)
            else:
                tunnel.close(CloseReason.SHUTDOWN, "stopped by signal", ErrorCode.NO_ERROR,
                             "agent stopping")
        elif self._handshaking is not None:  # do not wait for a mute server's timeout
            self._handshaking.close()

    def _close_when_drained(self, tunnel):
        deadline = time.monotonic() + self.drain_timeout
        while tunnel.pumps and tunnel.close_reason is None and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL)
        tunnel.close(CloseReason.SHUTDOWN, "stopped by signal")  # our GOAWAY went out already

    def run(self):
        attempt = 0
        refused_by = set()  # gateways that gave a per-gateway fatal answer, since the last success
        last_at_once = float("-inf")
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.connect_once()
                why, min_delay = "connection closed", 0.0
                refused_by.clear()
            except Fatal as exc:
                refused_by.add(self.gateway)
                if exc.exit_code not in PER_GATEWAY_EXITS or refused_by >= set(self._addresses()):
                    log.error("%s", exc)
                    return exc.exit_code
                # In a fleet one gateway may be misconfigured or mid-upgrade: try the others.
                why, min_delay = str(exc), 0.0
            except Retry as exc:
                why, min_delay = str(exc), exc.min_delay
                if exc.busy:
                    attempt = min(attempt, BUSY_BACKOFF_ROUND)
                if exc.at_once and started - last_at_once >= AT_ONCE_GAP:
                    # A server that drained said goodbye: it, or the fleet, is ready for us
                    # now; only failures spread reconnects out (and a server that keeps
                    # draining at once gets the backoff, not a tight loop).
                    last_at_once = started
                    log.warning("%s: %s; reconnecting now", self.gateway, why)
                    attempt = 0
                    continue
            except (OSError, ProtocolError, noise.HandshakeError) as exc:
                why, min_delay = _describe(exc), 0.0
            except gevent.Timeout:
                why, min_delay = "handshake timed out", 0.0
            if self._stopping.is_set():
                break
            if time.monotonic() - started >= BACKOFF_RESET_AFTER:
                attempt = 0
            delay = max(min_delay, backoff_delay(attempt, cap=self.backoff_cap))
            attempt += 1
            log.warning("%s: %s; reconnecting in %.1f s", self.gateway, why, delay)
            self._stopping.wait(delay)
        return EXIT_OK

    def connect_once(self):
        sock = self._connect()
        try:
            self._handshaking = sock
            with gevent.Timeout(HANDSHAKE_TIMEOUT):
                session, info, pending = self._handshake(sock)
            self._handshaking = None
            sock.settimeout(None)
            self._serve(sock, session, info, pending)
        finally:
            self._handshaking = None
            sock.close()

    def enroll_once(self):
        """One session that only proves an invite (``extra_config``): the server's OK means
        the grant is bound to our key; we say GOAWAY NO_ERROR at once and return its OK."""
        sock = self._connect()
        try:
            with gevent.Timeout(HANDSHAKE_TIMEOUT):
                session, info, _ = self._handshake(sock)
                session.goaway(ErrorCode.NO_ERROR, "enrolled")
                sock.sendall(session.data_to_send())
            return info
        finally:
            sock.close()

    def _connect(self):
        """Connect to the gateways' addresses in turn, starting one further each attempt: a
        refused connect moves on at once, and a gateway that accepts but then fails (paused,
        half dead) costs one attempt. A name with several addresses (DNS round robin) counts
        as that many gateways."""
        addresses = self._addresses()
        start = self._turn
        self._turn += 1
        error = None
        for step in range(len(addresses)):
            self.gateway = addresses[(start + step) % len(addresses)]
            try:
                return transport.dial(self.gateway, self._proxy_for(self.gateway),
                                      CONNECT_TIMEOUT, self.source_address)
            except transport.ProxyRefused as exc:
                raise Fatal(EXIT_PROXY_REFUSED, str(exc)) from None
            except OSError as exc:
                error = exc
        raise error

    def _proxy_for(self, gateway):
        """The Proxy to dial ``gateway`` through, or None. An address resolved from a name was
        resolved because the name needed none (no_proxy matches names, not their addresses)."""
        if gateway in self._resolved:
            return None
        return proxies.choose(gateway, self.proxy)

    def _addresses(self):
        addresses = []
        for gateway in self.gateways:
            if gateway.scheme != "tcp" or proxies.choose(gateway, self.proxy) is not None:
                # TLS and WebSocket need the name (SNI, Host), and a proxy resolves it itself
                if gateway not in addresses:
                    addresses.append(gateway)
                continue
            host, port = gateway.address
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror:
                infos = []
            # sorted: a DNS server that rotates its answers must not undo our own rotation
            found = sorted({(info[4][0], port) for info in infos}) or [(host, port)]
            found = [gateway_url.GatewayUrl("tcp", *address) for address in found]
            self._resolved.update(found)
            addresses.extend(a for a in found if a not in addresses)
        return addresses

    def _handshake(self, sock):
        set_nodelay(sock)
        enable_keepalive(sock)
        preamble = wire.encode_preamble()
        handshake = noise.Initiator(self.key, self.server_key, wire.prologue(preamble))
        sock.sendall(preamble + handshake.act_one())
        first = recv_exact(sock, 1)
        if first == wire.MAGIC[:1]:
            self._rejected(first + recv_exact(sock, wire.PREAMBLE_SIZE - 1))
        try:
            act_three = handshake.read_act_two(first + recv_exact(sock, noise.ACT_TWO_SIZE - 1))
        except noise.HandshakeError as exc:
            if exc.reason is noise.HandshakeFault.ACT2_BAD_TAG:
                raise Fatal(EXIT_SERVER_KEY_MISMATCH, self.on_mismatch()) from None
            raise
        session = protocol.Session(protocol.AGENT, handshake.send_cipher, handshake.recv_cipher,
                                   window=None, guard=protocol.FloodGuard(time.monotonic))
        session.send_config({"subdomain": self.name, "agent": "diglett/%s" % __version__,
                             "features": sorted(protocol.FEATURES), **self.extra_config})
        sock.sendall(act_three + session.data_to_send())
        events = []
        while not events:
            data = sock.recv(64 * 1024)
            if not data:
                raise Retry("server closed the connection before answering CONFIG")
            events = session.receive_data(data)
        first_event, pending = events[0], events[1:]
        if type(first_event) is protocol.Refused:
            self._refused(first_event)
        if type(first_event) is protocol.GoAwayReceived:
            raise Retry("server said goaway: %s" % wire.code_name(first_event.code))
        return session, first_event.info, pending

    def _rejected(self, data):
        server_max, code = wire.parse_reject(data)
        if code == RejectCode.SERVER_KEY_MISMATCH:
            raise Fatal(EXIT_SERVER_KEY_MISMATCH, self.on_mismatch())
        if code == RejectCode.UNSUPPORTED_VERSION:
            raise Fatal(EXIT_VERSION, "the server speaks wire version %d, this agent %d: "
                        "upgrade diglett on the older side" % (server_max, wire.WIRE_VERSION))
        raise Retry("server busy (%s)" % getattr(code, "name", code), busy=True)

    def _refused(self, event):
        message = "server refused %r: %s (%s)" % (self.name, event.reason, wire.code_name(event.code))
        exit_code = _REFUSALS.get(event.code)
        if exit_code is not None:
            raise Fatal(exit_code, message)
        raise Retry(message)

    def _serve(self, sock, session, info, pending):
        ping = info.get("ping_interval") or KEEPALIVE_PING
        label = "subdomain=%s" % self.name
        self.tunnel = Tunnel(sock, session, label=label, ping_interval=ping,
                             dead_after=3 * ping, on_event=self._on_event)
        self._goaway = None
        print("tunnel up: %s -> %s:%d (server port %s)"
              % (info.get("host"), self.backend[0], self.backend[1], info.get("port")),
              file=self.out, flush=True)
        log.info("%s tunnel up: host=%s port=%s cipher=%s", label, info.get("host"),
                 info.get("port"), session.cipher_name)
        self.tunnel.start(pending)
        if self._stopping.is_set():
            self.tunnel.close(CloseReason.SHUTDOWN, "stopped by signal", ErrorCode.NO_ERROR,
                              "agent stopping")
        detail = self.tunnel.wait()
        self.tunnel = None
        if self._goaway is not None:
            code, reason, retry_after = self._goaway
            if code in _GOAWAY_FATAL:
                raise Fatal(_GOAWAY_FATAL[code], "server ended the tunnel: %s (%s)"
                            % (reason, wire.code_name(code)))
            min_delay = kick_delay(retry_after, reason) if code == ErrorCode.KICKED else 0.0
            raise Retry("server said goaway: %s (%s)" % (reason, wire.code_name(code)), min_delay,
                        at_once=code == ErrorCode.SHUTTING_DOWN)
        if not self._stopping.is_set():
            raise Retry(detail)

    def _on_event(self, event):
        kind = type(event)
        if kind is protocol.StreamOpened:
            self.tunnel.add_stream(event.stream_id,
                                   connect=functools.partial(self._connect_backend, event.info))
        elif kind is protocol.GoAwayReceived:
            self._goaway = (event.code, event.reason, event.retry_after)
            if event.code == ErrorCode.SHUTTING_DOWN:  # draining: open streams carry on
                log.warning("subdomain=%s server is draining (%s); open streams continue, "
                            "then reconnecting", self.name, event.reason)
            elif event.code == ErrorCode.REPLACED:  # make-before-break: ours finish first
                log.warning("subdomain=%s replaced by a new connection of this key; %d open "
                            "streams finish, then this agent exits", self.name,
                            len(self.tunnel.pumps))
            else:
                self.tunnel.close(CloseReason.AGENT_LEFT, "server said goaway")

    def _connect_backend(self, info=None):
        """Dial the backend for one stream (``info``: its OPEN's JSON); with --proxy-protocol
        the header goes first, before any byte of the stream."""
        try:
            sock = socket.create_connection(self.backend, timeout=BACKEND_CONNECT_TIMEOUT)
        except OSError as exc:
            log.warning("subdomain=%s backend %s:%d: CONNECT_FAILED: %s",
                        self.name, *self.backend, _describe(exc))
            raise
        sock.settimeout(None)
        if self.proxy_protocol:
            try:
                sock.sendall(self._proxy_header(info or {}, sock.getpeername()[:2]))
            except OSError:
                sock.close()
                raise
        return sock

    def _proxy_header(self, info, backend_address):
        try:
            return proxy_header(info, backend_address)
        except proxyproto.HeaderError as exc:
            log.warning("subdomain=%s OPEN names no usable client address (%s): sending a "
                        "LOCAL PROXY header", self.name, exc)
            return proxyproto.encode_local()


def proxy_header(info, backend_address):
    """The PROXY v2 header for one stream's backend: OPEN's ``remote`` (the client) as source,
    its ``local`` (the address the client reached) as destination, else the backend's own
    address. An OPEN without ``remote`` (an older server) gets a LOCAL header: the backend
    then sees the agent's own address, as without --proxy-protocol."""
    if info.get("remote") is None:
        return proxyproto.encode_local()
    source = proxyproto.parse_address(info["remote"])
    local = info.get("local")
    destination = backend_address if local is None else proxyproto.parse_address(local)
    return proxyproto.encode_v2(source, destination)


def _describe(exc):
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
