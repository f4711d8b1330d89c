"""One connected agent: its Tunnel, the door it serves, and how it ended.

An AgentSession takes the visitors its name's Door (diglett.gateway.doors) hands it and opens
a stream for each (reading a PROXY header first from a trusted proxy), within the stream
limit, the open rate and the gateway's memory budget; it records its start and end through
the server's SessionEvents (its end when the door says so: at once, after a hold, or at a
handover to a newer session of the same key).
Readers of its state (the HTTP API, the status page, metrics) use ``snapshot()``, never the
Tunnel or its pumps.
"""

import ipaddress
import logging
import time
from dataclasses import dataclass

import gevent
import gevent.event
import gevent.pool

from diglett import __version__, crypto, protocol, proxyproto, wire
from diglett.gateway.limits import TokenBucket
from diglett.reasons import CloseReason
from diglett.registry import SessionRow
from diglett.sockets import close_with_rst, reset_unless_finished, set_nodelay
from diglett.tunnel import Tunnel
from diglett.wire import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

DRAIN_POLL = 0.05  # seconds between looks at a handed-over session's open streams
LIMIT_LOG_INTERVAL = 10.0  # seconds between log lines about the same limit being hit
PROXY_HEADER_TIMEOUT = 5.0  # seconds a proxy_trusted source has to send its PROXY header


class ProxyHeaderTimeout(Exception):
    def __str__(self):
        return "no complete header within %.0f s" % PROXY_HEADER_TIMEOUT


@dataclass(frozen=True)
class SessionSnapshot:
    """What a live session looks like at one moment, for the API, status page and metrics."""

    row: SessionRow
    public_host: str
    bytes_in: int  # read from visitors, sent to the agent
    bytes_out: int  # from the agent, delivered to visitors
    streams_open: int
    streams_opened: int
    buffered: int  # bytes held for visitors that have not read them yet
    idle_resets: int
    flooded: bool  # ended by the flood guard
    refused_streams: int  # visitors reset at the stream limit
    budget_refusals: int  # visitors reset because the memory budget was reached

    def to_json(self):
        data = self.row.to_json()
        data.update(public_host=self.public_host, bytes_in=self.bytes_in,
                    bytes_out=self.bytes_out, streams_open=self.streams_open,
                    streams_opened=self.streams_opened)
        return data


class AgentSession:
    def __init__(self, server, sock, completed, name, grant, door, remote):
        self.server = server
        self.subdomain = name
        self.key = completed.key
        self.grant = grant
        self.session_id = completed.session_id
        self.remote = remote
        self.started = time.time()
        self.ended = gevent.event.Event()
        self.recorded = False  # our session row is committed
        self.accepting = True  # visitors may still become streams (not draining or ending)
        self._end_reported = False
        self.refused_streams = 0  # clients reset at the stream limit
        self.budget_refusals = 0  # clients reset because the memory budget was reached
        self._refusal_logged = float("-inf")
        self._proxied = gevent.pool.Group()  # trusted proxies' connections reading their header
        self.label = "subdomain=%s agent=%s session=%s" % (name, crypto.fingerprint(self.key),
                                                           self.session_id)
        self.door = door
        self.host, self.port = door.host, door.port
        config = server.config
        self.tunnel = Tunnel(sock, completed.session, label=self.label,
                             ping_interval=config.ping_interval, dead_after=config.dead_after,
                             write_stall_timeout=config.write_stall_timeout,
                             stream_idle_timeout=config.stream_idle_timeout,
                             on_event=self._on_event, ping_when_silent=True)
        self.open_rate = TokenBucket(config.open_rate, config.open_burst)
        completed.session.accept({
            "subdomain": name, "host": server.events.host_of(name), "port": self.port,
            "window": config.stream_window, "max_streams": config.max_streams,
            "ping_interval": config.ping_interval,
            "features": sorted(completed.session.offered),  # all we know is all we use
            "server": "diglett/%s" % __version__,
        })

    def row(self):
        server = self.server
        return SessionRow(id=self.session_id, subdomain=self.subdomain, key=self.key,
                          host=self.host, port=self.port, remote=self.remote,
                          started=self.started, ended=None, state="active", reason=None,
                          instance=server.instance, gateway=server.gateway_id)

    def snapshot(self):
        tunnel = self.tunnel
        return SessionSnapshot(
            row=self.row(), public_host=self.server.events.host_of(self.subdomain),
            bytes_in=tunnel.bytes_up, bytes_out=tunnel.bytes_down,
            streams_open=len(tunnel.pumps), streams_opened=tunnel.streams_opened,
            buffered=tunnel.buffered, idle_resets=tunnel.idle_resets, flooded=tunnel.flooded,
            refused_streams=self.refused_streams, budget_refusals=self.budget_refusals)

    @property
    def streams_open(self):
        return len(self.tunnel.pumps)

    @property
    def buffered(self):
        return self.tunnel.buffered

    # ----- lifecycle ------------------------------------------------------------------
    def run(self):
        server = self.server
        server.sessions[self.subdomain] = self
        server.ports.remember(self.subdomain, self.port)
        server.events.started(self.row(), recorded=self._recorded)
        log.info("%s connected from %s, tunnel port %s:%d", self.label, self.remote,
                 self.host, self.port)
        detail = "internal error"
        try:
            self.tunnel.start()
            self.door.attach(self)  # after our start is queued: visitors held meanwhile, too
            detail = self.tunnel.wait()
        finally:  # whatever happened, the door learns of it and the end gets recorded
            self.accepting = False
            reason = self.tunnel.close_reason or CloseReason.ERROR
            if server.sessions.get(self.subdomain) is self:
                del server.sessions[self.subdomain]
            server.draining.discard(self)
            server.counters.session_closed(self.snapshot())  # with the removal: none goes back
            self.door.leave(self, reason, _traffic(self.tunnel))
            self.ended.set()
        log.info("%s ended reason=%s (%s) after %.0f s, %d streams, %d bytes in, %d bytes out",
                 self.label, reason, detail, time.time() - self.started,
                 self.tunnel.streams_opened, self.tunnel.bytes_up, self.tunnel.bytes_down)

    def _recorded(self):
        self.recorded = True  # from now on the takeover check may look for it
        self.server.recorded_sessions += 1  # ... and knows it has one more to look at

    def report_end(self, reason, traffic):
        """Record the end (row, hook deliveries, signal) once; the door decides when."""
        if not self._end_reported:
            self._end_reported = True
            self.server.events.ended(self.row(), reason, traffic)

    def drain(self):
        """Take no new clients and tell the agent, but let the open streams finish."""
        self.accepting = False
        self.tunnel.session.goaway(ErrorCode.SHUTTING_DOWN, "server draining")
        self.tunnel.wake()

    def hand_over(self):
        """A newer session of our key took the door: our end is reported now, the agent is
        told (GOAWAY REPLACED, which a current agent takes as "finish your streams"), and the
        open streams run on for up to drain_timeout before the connection closes."""
        self.accepting = False
        if self.server.sessions.get(self.subdomain) is self:
            del self.server.sessions[self.subdomain]
        self.server.draining.add(self)
        self.report_end(CloseReason.REPLACED, _traffic(self.tunnel))
        log.info("%s replaced by a new session of the same key; %d open streams finish "
                 "first", self.label, len(self.tunnel.pumps))
        self.tunnel.session.goaway(ErrorCode.REPLACED, "replaced by a new connection")
        self.tunnel.wake()
        gevent.spawn(self._close_when_drained, self.server.config.drain_timeout,
                     CloseReason.REPLACED, "replaced by a new connection")

    def _close_when_drained(self, timeout, reason, detail):
        """End the tunnel once its streams are done, or at ``timeout`` (the peer knows: it
        got or sent a GOAWAY)."""
        deadline = time.monotonic() + timeout
        while self.tunnel.pumps and self.tunnel.close_reason is None \
                and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL)
        if self.tunnel.pumps and self.tunnel.close_reason is None:
            log.warning("%s drain_timeout (%s s) reached: resetting %d open streams",
                        self.label, timeout, len(self.tunnel.pumps))
        self.tunnel.close(reason, detail)

    def terminate(self, reason, code, message, retry_after=0):
        """End the session for ``reason`` (a CloseReason), telling the agent with GOAWAY."""
        self.tunnel.close(reason, message, code, message, retry_after)

    def _on_event(self, event):
        if type(event) is not protocol.GoAwayReceived:
            return
        detail = "agent said goaway: %s %s" % (wire.code_name(event.code), event.reason)
        if event.code != ErrorCode.NO_ERROR or not self.tunnel.pumps:
            self.tunnel.close(CloseReason.AGENT_LEFT, detail)
            return
        # A stopping agent finishes its open streams; new visitors wait at the door.
        self.accepting = False
        log.info("%s agent is stopping; %d open streams finish first", self.label,
                 len(self.tunnel.pumps))
        gevent.spawn(self._close_when_drained, self.server.config.drain_timeout,
                     CloseReason.AGENT_LEFT, detail)

    # ----- visitors -------------------------------------------------------------------
    def take(self, client, address):
        """A visitor from the door: a stream, or a reset at a limit. False when this session
        takes no visitor any more (draining or ending): the door holds it instead."""
        if not self.accepting:
            return False
        config = self.server.config  # read per client: SIGHUP may have changed the limits
        self.open_rate.rate, self.open_rate.burst = config.open_rate, config.open_burst
        if not self._admit(client, address, config):
            return True
        if config.proxy_trusted and trusted(address, config.proxy_trusted):
            self._proxied.spawn(self._open_proxied, client, address)  # never block accept
            return True
        if not self._open_stream(client, address[:2], client.getsockname()[:2]):
            self.accepting = False
        return True

    def _admit(self, client, address, config):
        """Below the stream limit and the memory budget; else the visitor is reset."""
        max_streams = config.max_streams
        if len(self.tunnel.pumps) + len(self._proxied) >= max_streams:
            self.refused_streams += 1
            self._refuse_client(client, address, "stream limit %d reached" % max_streams,
                                self.refused_streams)
            return False
        if self.server.over_budget():
            self.budget_refusals += 1
            self._refuse_client(client, address, "memory budget reached", self.budget_refusals)
            return False
        return True

    def _refuse_client(self, client, address, why, count):
        """Reset at once (a proxy answers 502 instead of hanging); a flood logs once."""
        now = time.monotonic()
        if now - self._refusal_logged >= LIMIT_LOG_INTERVAL:
            self._refusal_logged = now
            log.warning("%s %s, refusing %s:%d (%d refused so far)",
                        self.label, why, address[0], address[1], count)
        close_with_rst(client)

    def _open_stream(self, client, remote, local):
        """OPEN a stream for ``client``, naming both its ends; False once stream ids run out."""
        tunnel = self.tunnel
        self.open_rate.take()
        set_nodelay(client)
        reset_unless_finished(client)
        try:
            stream_id = tunnel.session.open_stream({"remote": proxyproto.format_address(remote),
                                                    "local": proxyproto.format_address(local)})
        except ProtocolError:  # 2^32-1 streams in one session: let the agent reconnect
            close_with_rst(client)
            tunnel.close(CloseReason.AGENT_LEFT, "stream ids exhausted", ErrorCode.NO_ERROR,
                         "stream ids exhausted")
            return False
        tunnel.add_stream(stream_id, client)
        tunnel.send_soon()
        return True

    def _open_proxied(self, client, address):
        """A proxy_trusted source: its PROXY header names the real client, then the stream
        opens with that address; no valid header in time closes the connection, logged."""
        try:
            with gevent.Timeout(PROXY_HEADER_TIMEOUT, ProxyHeaderTimeout):
                header = read_proxy_header(client)
        except (proxyproto.HeaderError, ProxyHeaderTimeout, OSError) as exc:
            log.warning("%s proxy=%s closed: no valid PROXY header: %s", self.label,
                        proxyproto.format_address(address), exc)
            close_with_rst(client)
            return
        except gevent.GreenletExit:  # the session ended while the header was on its way
            close_with_rst(client)
            raise
        if not self.accepting:  # drained or ended meanwhile: take no new stream
            close_with_rst(client)
            return
        # LOCAL (the proxy's own health check) or no usable family: the real endpoints
        self._open_stream(client, header.source or address[:2],
                          header.destination or client.getsockname()[:2])


def read_proxy_header(sock):
    """The PROXY header that starts ``sock``, read without taking a byte of what follows."""
    data = b""
    while True:
        header = proxyproto.parse(data)
        if header is not None:
            return header
        chunk = sock.recv(proxyproto.wanted(data))
        if not chunk:
            raise ConnectionError("connection closed after %d bytes" % len(data))
        data += chunk


def trusted(address, networks):
    """Is the source ``address`` in one of ``networks`` ([server] proxy_trusted)?"""
    ip = ipaddress.ip_address(address[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack listener's IPv4 client
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _traffic(tunnel):
    return "bytes_in=%d bytes_out=%d streams=%d" % (
        tunnel.bytes_up, tunnel.bytes_down, tunnel.streams_opened)
