"""Drives one protocol.Session over a gevent socket; shared by the server and the agent.

A Tunnel owns one agent connection: a reader (a watcher the hub calls) that decrypts and
dispatches without ever waiting, the only writer greenlet that seals and sends, a keepalive
greenlet, and one diglett.pump.Pump per stream moving bytes between a local socket and the
session. It must not know about grants, the registry or signals: server.py and agent.py do.
"""

import logging
import os
import time

import gevent
from gevent.event import Event

from diglett import protocol, wire
from diglett.pump import Pump
from diglett.reasons import CloseReason
from diglett.sockets import (MSG_DONTWAIT, close_with_rst, kernel_socket, rest_after,
                             sendall_buffers)
from diglett.wire import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024  # bytes read from the agent connection per recv
# Every tunnel of the process reads into this one buffer: a fresh 256 KiB bytes object per
# recv would be mapped and unmapped by malloc each time (see pump.STREAM_RECV_MAX), and one
# buffer per tunnel would cost 256 KiB per agent. Sharing is safe because _readable runs in
# the hub, which cannot switch away, and Session.receive_data keeps no view of its input.
_READ_BUFFER = bytearray(RECV_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)
GOAWAY_FLUSH_TIMEOUT = 2  # seconds spent flushing a GOAWAY before the socket is closed
IDLE_SWEEP_MAX = 30.0  # longest pause between two looks for idle streams
# While draining, a stream this quiet since its last answer is taken for a client's spare
# kept-alive connection (an HTTP pool's): it would never end by itself, and would only be
# reset at the end of the drain, maybe with a request on it by then.
SPARE_IDLE = 0.2


class TunnelClosed(Exception):
    """The agent connection ended; the message says why, for the log."""

    reason = CloseReason.AGENT_LEFT


class PeerSilent(TunnelClosed):
    reason = CloseReason.DEAD


class WriteStalled(Exception):
    pass


class Tunnel:
    """One authenticated agent connection after CONFIG/OK, until it closes."""

    def __init__(self, sock, session, *, label, ping_interval, dead_after,
                 write_stall_timeout=30, stream_idle_timeout=0, on_event=None,
                 ping_when_silent=False):
        self.sock = sock
        self.session = session
        self.label = label  # "subdomain=foo session=ab12..." on every log line
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.write_stall_timeout = write_stall_timeout
        self.stream_idle_timeout = stream_idle_timeout  # 0: streams may idle for ever
        # Ping only after ping_interval without a byte from the peer: the server's side, whose
        # agents ping it as often (thousands of idle agents then cost half the records).
        self.ping_when_silent = ping_when_silent
        self.buffered = 0  # bytes received for local sockets and not yet delivered to them
        self.on_event = on_event or (lambda event: None)  # role-specific events
        self.pumps = {}
        self.bytes_up = 0  # read from local stream sockets and sent into the tunnel
        self.bytes_down = 0  # received from the tunnel and delivered to local sockets
        self.streams_opened = 0
        self.idle_resets = 0
        self.flooded = False  # closed by the flood guard (a limit, counted in /metrics)
        self.last_recv = time.monotonic()
        self.close_reason = None  # a CloseReason once closing
        self.close_detail = ""  # what happened, in words, for the log
        self.closed = Event()
        self._wake = Event()
        self._greenlets = []
        self._read_watcher = self._write_watcher = None  # made by start()
        self._goaway = None  # (code, reason, retry_after) to flush before closing
        self._write_started = None  # monotonic time the pending sendall began
        self._writing = False  # the writer greenlet is inside a write
        self._pending = None  # the rest of a write send_soon could only start
        # A socket reads into the process's one read buffer; a wrapper (TLS: records to drain
        # first) keeps its recv(). Looked up on the type: TlsSocket's __getattr__ would hand
        # out the TCP socket's recv_into, which reads ciphertext.
        self._recv_into = (kernel_socket(sock).recv_into if hasattr(type(sock), "recv_into")
                           else None)
        self._sendmsg = kernel_socket(sock).sendmsg  # TlsSocket: its own (no _sock)

    # ----- lifecycle ------------------------------------------------------------------
    def start(self, pending_events=()):
        """Run the tunnel; ``pending_events`` arrived with the record that completed setup.

        Reading is a watcher the hub calls (no greenlet switch per record, which is most of a
        small round trip's cost); writing and the keepalive are greenlets. The socket's
        timeout is 0, so nothing waits on it but the writer, on its own watcher.
        """
        self.sock.settimeout(0.0)
        loop = gevent.get_hub().loop
        self._read_watcher = loop.io(self.sock.fileno(), 1)
        self._write_watcher = loop.io(self.sock.fileno(), 2)
        self._dispatch(pending_events)
        self._greenlets = [gevent.spawn(self._guard, loop)
                           for loop in (self._write_loop, self._keepalive_loop)]
        self._read_watcher.start(self._readable)
        if getattr(self.sock, "pending", None) and self.sock.pending():
            loop.run_callback(self._readable)  # TLS bytes already decrypted: no fd event comes
        self.wake()

    def wait(self):
        """Block until the tunnel ends, then tear everything down; returns the detail
        (``close_reason`` holds the CloseReason)."""
        self.closed.wait()
        self._teardown()
        return self.close_detail

    def close(self, reason, detail="", code=None, message="", retry_after=0):
        """End the tunnel (idempotent: the first reason stays); with ``code`` a GOAWAY tells
        the peer why first, and how long to wait before it comes back."""
        if self.close_reason is None:
            self.close_reason = CloseReason(reason)
            self.close_detail = detail or str(reason)
            if code is not None:
                self._goaway = (code, message or self.close_detail, retry_after)
            self.closed.set()

    def wake(self):
        self._wake.set()

    def send_soon(self):
        """Write what is queued now, from the calling greenlet, if the socket takes it without
        waiting; otherwise (or while the writer is busy) hand it to the writer greenlet.

        Never blocks, so the reader may call it too; it saves a greenlet switch per message,
        which is most of a small round trip's cost. Nonce order stays wire order: records
        are sealed and written with no switch in between, and a write the socket took only
        in part is finished by the writer before anything else.
        """
        if self._writing or self._pending is not None or self.close_reason is not None:
            self._wake.set()
            return
        buffers = self.session.buffers_to_send()
        if not buffers:
            return
        try:
            sent = self._sendmsg(buffers, (), MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(CloseReason.AGENT_LEFT, "connection lost: %s" % (exc.strerror or exc))
            return
        if sent < sum(map(len, buffers)):
            self._pending = rest_after(buffers, sent)
            self._wake.set()
        elif self.session.has_output:  # more than one call returns: the writer sends the rest
            self._wake.set()

    def _guard(self, loop):
        try:
            loop()
        except (ProtocolError, TunnelClosed, WriteStalled, OSError) as exc:
            self._failed(exc)
        except Exception:  # a bug or MemoryError ends this tunnel at once, logged, no more
            log.exception("%s %s failed", self.label, loop.__name__)
            self.close(CloseReason.ERROR, "internal error", ErrorCode.INTERNAL_ERROR)

    def _failed(self, exc):
        """End the tunnel for an error of the reader or of a loop, with the right GOAWAY."""
        if isinstance(exc, ProtocolError):
            if exc.code == ErrorCode.ENHANCE_YOUR_CALM:
                self.flooded = True
            self.close(CloseReason.ERROR, "protocol error: %s" % exc, exc.code, "protocol error")
            try:  # after the close: from the hub, a contended log lock cannot be waited for
                log.warning("%s protocol error: %s", self.label, exc)
            except Exception:
                pass
        elif isinstance(exc, TunnelClosed):
            self.close(exc.reason, str(exc))
        elif isinstance(exc, WriteStalled):
            self.close(CloseReason.AGENT_LEFT, str(exc) or "write stalled")
        else:
            self.close(CloseReason.AGENT_LEFT, "connection lost: %s" % (exc.strerror or exc))

    def _teardown(self):
        current = gevent.getcurrent()
        self._read_watcher.stop()
        gevent.killall([g for g in self._greenlets if g is not current])
        if self._goaway is not None:
            self._flush_goaway(*self._goaway)
        for pump in list(self.pumps.values()):
            pump.kill()  # session loss resets every stream: no truncated reply looks complete
        self._write_watcher.stop()  # before the close: a watcher must not outlive its fd
        if self._goaway is None:
            close_with_rst(self.sock)
        else:
            self.sock.close()

    def _flush_goaway(self, code, message, retry_after):
        if self._write_started is not None:
            return  # the writer was stopped inside a record: anything more would be garbage
        self.session.goaway(code, message, retry_after)
        try:
            with gevent.Timeout(GOAWAY_FLUSH_TIMEOUT):
                sendall_buffers(self.sock, (self._pending or []) + self.session.buffers_to_send(),
                                self._wait_writable)
        except (OSError, gevent.Timeout):
            pass

    # ----- reading, writing, keepalive ------------------------------------------------
    def _readable(self):
        """Called by the hub when the agent connection has bytes: one read, never a wait."""
        try:
            if self._recv_into is not None:
                data = _READ_VIEW[:self._recv_into(_READ_BUFFER)]
            else:
                data = self.sock.recv(RECV_SIZE)
            if not data:
                raise TunnelClosed("peer closed the connection")
            self.last_recv = time.monotonic()
            session = self.session
            self._dispatch(session.receive_data(data))
            if session.has_output:
                self.send_soon()
        except BlockingIOError:
            return
        except (ProtocolError, TunnelClosed, OSError) as exc:
            self._read_watcher.stop()
            self._failed(exc)
        except Exception:  # a bug here must end this tunnel, never the hub
            log.exception("%s reading failed", self.label)
            self._read_watcher.stop()
            self.close(CloseReason.ERROR, "internal error", ErrorCode.INTERNAL_ERROR)

    def _wait_writable(self):
        gevent.get_hub().wait(self._write_watcher)

    def _write_loop(self):
        session, sock, wake = self.session, self.sock, self._wake
        while True:
            wake.wait()
            wake.clear()
            self._writing = True
            while self._pending is not None or session.has_output:
                buffers, self._pending = self._pending or session.buffers_to_send(), None
                if buffers:
                    self._write_started = time.monotonic()  # the keepalive watches for stalls
                    sendall_buffers(sock, buffers, self._wait_writable)
                    self._write_started = None
            self._writing = False

    def _keepalive_loop(self):
        step = max(0.05, min(self.ping_interval, self.dead_after / 3.0,
                             self.write_stall_timeout / 3.0))
        next_ping = time.monotonic() + self.ping_interval
        next_sweep = 0.0
        while True:
            gevent.sleep(step)
            now = time.monotonic()
            if now - self.last_recv > self.dead_after:
                raise PeerSilent("peer silent for %.0f s" % (now - self.last_recv))
            started = self._write_started
            if started is not None and now - started > self.write_stall_timeout:
                raise WriteStalled("peer stopped reading: no send progress for %.0f s"
                                   % (now - started))
            if now >= next_ping:
                next_ping = now + self.ping_interval
                if not self.ping_when_silent or now - self.last_recv >= self.ping_interval:
                    self.session.ping(os.urandom(wire.PING_SIZE))
                    self.wake()
            if self.stream_idle_timeout and now >= next_sweep:
                next_sweep = now + min(IDLE_SWEEP_MAX, self.stream_idle_timeout / 4.0)
                self._reset_idle_streams(now)

    def _reset_idle_streams(self, now):
        """ChannelTimeout: a stream that moved no byte either way for too long is reset."""
        count = self.reset_idle_streams(self.stream_idle_timeout, now)
        if count:
            log.info("%s reset %d streams idle for %s s", self.label, count,
                     self.stream_idle_timeout)

    def reset_spare_streams(self, answers_go_to_local):
        """While draining: reset the streams quiet for SPARE_IDLE s since their last answer,
        which went to the local socket on the gateway (the visitor), away from it on the
        agent (from the backend). A peer still waiting for its answer spoke last: kept."""
        return self.reset_idle_streams(SPARE_IDLE, last_to_local=answers_go_to_local)

    def reset_idle_streams(self, idle_for, now=None, last_to_local=None):
        """Reset the streams that moved no byte either way for ``idle_for`` s (and, unless
        ``last_to_local`` is None, whose last bytes went that way); how many."""
        now = time.monotonic() if now is None else now
        idle = [pump for pump in self.pumps.values() if now - pump.last_active > idle_for
                and last_to_local in (None, pump.last_to_local)]
        for pump in idle:
            pump.abort_idle()
        self.idle_resets += len(idle)
        return len(idle)

    # ----- events ---------------------------------------------------------------------
    def _dispatch(self, events):
        pumps = self.pumps
        for event in events:
            kind = type(event)
            if kind is protocol.DataReceived:
                pump = pumps.get(event.stream_id)
                if pump is not None:
                    pump.deliver(event.data)
            elif kind is protocol.WindowUpdated:
                pump = pumps.get(event.stream_id)
                if pump is not None:
                    pump.credit_arrived()
            elif kind is protocol.StreamEnded:
                pump = pumps.get(event.stream_id)
                if pump is not None:
                    pump.end_of_input()
            elif kind is protocol.StreamReset:
                pump = pumps.get(event.stream_id)
                if pump is not None:
                    pump.kill()
            else:
                self.on_event(event)

    # ----- streams --------------------------------------------------------------------
    def add_stream(self, stream_id, sock=None, connect=None):
        """Pump a stream through ``sock``, or through the socket ``connect()`` returns.

        A tunnel that is closing takes no stream: the teardown has already reset the ones it
        had, and a pump added after that would hang its client for ever.
        """
        if self.close_reason is not None:
            if sock is not None:
                close_with_rst(sock)
            return None
        pump = Pump(self, stream_id, sock, connect)
        self.pumps[stream_id] = pump
        self.streams_opened += 1
        pump.start()
        return pump
