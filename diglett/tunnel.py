"""Drives one protocol.Session over a gevent socket; shared by the server and the agent.

A Tunnel owns one agent connection: a reader (a watcher the hub calls) that decrypts and
dispatches without ever waiting, the only writer greenlet that seals and sends, a keepalive
greenlet, and one Pump per stream moving bytes between a local socket and the session.
It must not know about grants, the registry or signals: server.py and agent.py do.
"""

import collections
import logging
import os
import socket
import struct
import time

import gevent
from gevent.event import Event

from diglett import protocol, wire
from diglett.reasons import CloseReason
from diglett.wire import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024  # bytes read from the agent connection per recv
STREAM_RECV_MAX = 256 * 1024  # bytes read from a stream socket per recv (within credit)
LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
LINGER_OFF = struct.pack("ii", 0, 0)  # the default: close() sends FIN after queued data
GOAWAY_FLUSH_TIMEOUT = 2  # seconds spent flushing a GOAWAY before the socket is closed
IDLE_SWEEP_MAX = 30.0  # longest pause between two looks for idle streams
IOV_MAX = 1024  # buffers per sendmsg (the Linux limit)
READ_PER_WAKE = 256 * 1024  # bytes a stream reads per readiness before the hub runs others
MSG_DONTWAIT = socket.MSG_DONTWAIT  # a write that must not wait: gevent raises instead


class TunnelClosed(Exception):
    """The agent connection ended; the message says why, for the log."""

    reason = CloseReason.AGENT_LEFT


class PeerSilent(TunnelClosed):
    reason = CloseReason.DEAD


class WriteStalled(Exception):
    pass


def set_nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (tests may use socketpairs)


def sendall_buffers(sock, buffers, wait_writable=None):
    """sendall for a list of buffers in one scatter-gather write each turn (no joining copy).
    A socket whose timeout is 0 needs ``wait_writable()`` to wait when the kernel is full."""
    views = [memoryview(buffer) for buffer in buffers]
    first = 0
    while first < len(views):
        try:
            sent = sock.sendmsg(views[first:first + IOV_MAX])
        except BlockingIOError:
            if wait_writable is None:
                raise
            wait_writable()
            continue
        while sent and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


def _rest(buffers, sent):
    """The views of ``buffers`` after the first ``sent`` bytes."""
    rest = []
    for buffer in buffers:
        if sent >= len(buffer):
            sent -= len(buffer)
        else:
            rest.append(memoryview(buffer)[sent:])
            sent = 0
    return rest


def recv_exact(sock, size):
    """Exactly ``size`` bytes (the handshake's fixed-size messages), or ConnectionError."""
    chunks = []
    left = size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("connection closed after %d of %d bytes"
                                  % (size - left, size))
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def enable_keepalive(sock):
    """Kernel keepalive and a user timeout: a second line behind the protocol's pings, so
    sends into a silently dropped path fail instead of filling buffers for minutes."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", 30000)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass


def reset_unless_finished(sock):
    """Make every close of ``sock`` a reset until Pump finishes the stream cleanly, so a
    process that dies (kill -9) resets its clients instead of the kernel sending a FIN
    that makes a truncated download look complete."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass


def close_with_rst(sock):
    """Abort a connection so the peer sees a reset, never a clean EOF after a short read."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()


class Tunnel:
    """One authenticated agent connection after CONFIG/OK, until it closes."""

    def __init__(self, sock, session, *, label, ping_interval, dead_after,
                 write_stall_timeout=30, stream_idle_timeout=0, on_event=None):
        self.sock = sock
        self.session = session
        self.label = label  # "subdomain=foo session=ab12..." on every log line
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.write_stall_timeout = write_stall_timeout
        self.stream_idle_timeout = stream_idle_timeout  # 0: streams may idle for ever
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
            sent = self.sock.sendmsg(buffers, (), MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(CloseReason.AGENT_LEFT, "connection lost: %s" % (exc.strerror or exc))
            return
        if sent < sum(map(len, buffers)):
            self._pending = _rest(buffers, sent)
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
                self.session.ping(os.urandom(wire.PING_SIZE))
                self.wake()
            if self.stream_idle_timeout and now >= next_sweep:
                next_sweep = now + min(IDLE_SWEEP_MAX, self.stream_idle_timeout / 4.0)
                self._reset_idle_streams(now)

    def _reset_idle_streams(self, now):
        """ChannelTimeout: a stream that moved no byte either way for too long is reset."""
        idle = [pump for pump in self.pumps.values()
                if now - pump.last_active > self.stream_idle_timeout]
        for pump in idle:
            pump.abort_idle()
        if idle:
            log.info("%s reset %d streams idle for %s s", self.label, len(idle),
                     self.stream_idle_timeout)
            self.idle_resets += len(idle)

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


class Pump:
    """Moves one stream's bytes both ways between its local socket and the session.

    ``up``: local socket -> DATA. No greenlet waits on the socket: a read watcher calls
    ``_readable`` from the hub when bytes (or EOF) are there, and it reads without waiting,
    within the stream's credit, at most READ_PER_WAKE bytes before the hub runs the others.
    Without credit the watcher stops, and the peer's WINDOW starts it again; so a slow agent
    or client backs up into this one socket and nowhere else, and an idle stream costs a
    watcher instead of a parked greenlet and its saved stack (8 KiB measured).
    ``down``: DATA -> local socket, returning credit only for bytes the socket accepted;
    written at once when the socket takes them, and by a down greenlet that runs only while
    bytes wait or a FIN is to be passed on. The socket's own timeout is 0: nothing may block
    on it but the down greenlet, which waits for writability on its own watcher.
    """

    def __init__(self, tunnel, stream_id, sock, connect):
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.sock = sock
        self._connect = connect
        self.buffer = collections.deque()
        self._connected = False
        self._input_ended = False  # the peer's FIN arrived
        self._fin_passed = False  # ... and was passed on to the local socket
        self._up_ended = False  # the local socket's EOF was sent on as FIN
        self._connecting = self._down = None
        self._reader = self._writer = None  # io watchers of the local socket
        self._done = False
        self._sending = False  # the down greenlet is inside a send with a popped chunk
        self.buffered = 0  # bytes in self.buffer
        self.last_active = time.monotonic()  # last byte moved either way (idle timeout)

    def start(self):
        if self.sock is None:
            self._connecting = gevent.spawn(self._connect_first)
        else:
            self._begin()

    def _connect_first(self):
        """The agent's side: dial the backend. kill() lets this finish rather than killing
        it, because a connect cut short closes its socket with a FIN, and a backend must
        never take an aborted stream for a complete one."""
        try:
            sock = self._connect()
        except OSError as exc:
            if not self._done:
                self._abort(ErrorCode.CONNECT_FAILED, "connect: %s" % exc)
            return
        except Exception as exc:  # a bug (e.g. in the PROXY header) costs this stream only
            log.exception("%s stream=%d connect failed", self.tunnel.label, self.stream_id)
            if not self._done:
                self._abort(ErrorCode.INTERNAL_ERROR, "connect: %s" % exc)
            return
        if self._done:  # reset while connecting: the backend sees a reset, not an empty stream
            close_with_rst(sock)
            return
        self.sock = sock
        self._begin()

    def _begin(self):
        sock = self.sock
        set_nodelay(sock)
        sock.settimeout(0.0)
        loop = gevent.get_hub().loop
        self._reader = loop.io(sock.fileno(), 1)
        self._writer = loop.io(sock.fileno(), 2)
        self._connected = True
        if self.buffer or self._input_ended:  # arrived while connecting
            self._need_down()
        self._reader.start(self._readable)

    # ----- up: local socket -> tunnel ----------------------------------------------------
    def _readable(self):
        """Called by the hub, so it must never wait: reads what is there, within credit."""
        try:
            self._read_some()
        except OSError as exc:
            # bytes read before the local peer's reset still reach the remote peer
            self._abort(ErrorCode.STREAM_CLOSED, "upload side: %s" % exc, after_queued=True)
        except Exception:  # a bug here must cost this stream, never the hub
            log.exception("%s stream=%d upload failed", self.tunnel.label, self.stream_id)
            self._abort(ErrorCode.INTERNAL_ERROR, "internal error")

    def _read_some(self):
        tunnel, session, stream_id = self.tunnel, self.tunnel.session, self.stream_id
        recv = self.sock.recv
        budget = READ_PER_WAKE
        while budget > 0:
            credit = session.send_credit(stream_id)
            if credit <= 0:
                self._reader.stop()  # until a WINDOW brings credit (credit_arrived)
                if stream_id not in session.streams:
                    self._up_finished()
                return
            want = min(credit, STREAM_RECV_MAX, budget)
            try:
                data = recv(want)
            except BlockingIOError:
                return
            if not data:
                session.send_fin(stream_id)
                tunnel.send_soon()
                self._up_finished()
                return
            if not session.send_data(stream_id, data):
                self._up_finished()
                return
            self.last_active = time.monotonic()
            tunnel.bytes_up += len(data)
            tunnel.send_soon()
            if len(data) < want:
                return  # drained: a second recv would only say EAGAIN (the watcher calls again)
            budget -= len(data)

    def credit_arrived(self):
        reader = self._reader
        if self._done or self._up_ended or reader is None or reader.active:
            return
        reader.start(self._readable)

    def _up_finished(self):
        self._reader.stop()
        self._up_ended = True
        self._close_if_finished()

    # ----- down: tunnel -> local socket --------------------------------------------------
    def deliver(self, data):
        """DATA for the local socket: written at once when it takes it without waiting (no
        greenlet switch), else queued for the down greenlet."""
        if not self.buffer and not self._sending and self._connected:
            try:
                sent = self.sock.send(data)  # timeout 0: never waits
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                # Reset by the local peer. The failed send has consumed the socket's error, so
                # the next recv would read a clean EOF: abort now, or the remote peer would
                # see FIN, and a truncated stream would look complete.
                self._abort(ErrorCode.STREAM_CLOSED, "download side: %s" % exc)
                return
            if sent:
                self.tunnel.bytes_down += sent
                self.last_active = time.monotonic()
                self.tunnel.session.acknowledge(self.stream_id, sent)
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]
        self.buffer.append(data)
        self.buffered += len(data)
        self.tunnel.buffered += len(data)
        self._need_down()

    def end_of_input(self):
        self._input_ended = True
        idle = self._down is None or self._down.dead
        if idle and self._connected and not self.buffer and not self._done:
            try:
                self._pass_fin()  # nothing waits: no greenlet needed for the FIN either
            except OSError as exc:
                self._abort(ErrorCode.STREAM_CLOSED, "download side: %s" % exc)
        else:
            self._need_down()

    def _pass_fin(self):
        self.sock.shutdown(socket.SHUT_WR)
        self._fin_passed = True
        self._close_if_finished()

    def _need_down(self):
        """Start the down greenlet unless it runs (a running one re-checks before it ends)."""
        if self._connected and not self._done and (self._down is None or self._down.dead):
            self._down = gevent.spawn(self._down_loop)

    def _down_loop(self):
        tunnel, session, stream_id = self.tunnel, self.tunnel.session, self.stream_id
        buffer, sock = self.buffer, self.sock
        try:
            while buffer:  # what has arrived goes out in one write
                batch = [buffer.popleft() for _ in range(min(len(buffer), IOV_MAX))]
                size = sum(map(len, batch))
                self._sending = True
                sendall_buffers(sock, batch, self._wait_writable)
                self._sending = False
                self._delivered(size)
                tunnel.bytes_down += size
                session.acknowledge(stream_id, size)
                if session.has_output:
                    tunnel.send_soon()
            if self._input_ended:
                self._pass_fin()
            # all written: the greenlet ends; a later deliver() starts a new one
        except OSError as exc:
            self._abort(ErrorCode.STREAM_CLOSED, "download side: %s" % exc)

    def _wait_writable(self):
        gevent.get_hub().wait(self._writer)

    def _delivered(self, size):
        self.buffered -= size
        self.tunnel.buffered -= size
        self.last_active = time.monotonic()

    # ----- the end ------------------------------------------------------------------------
    def _close_if_finished(self):
        """Both halves ended cleanly: flush and close with a FIN (undoing the RST linger)."""
        if not (self._up_ended and self._fin_passed) or self._done:
            return
        self._done = True
        self._stop_watching()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
        except OSError:
            pass
        self.sock.close()
        self.tunnel.pumps.pop(self.stream_id, None)

    def abort_idle(self):
        self._abort(ErrorCode.IDLE_TIMEOUT, "idle for %s s" % self.tunnel.stream_idle_timeout)

    def _abort(self, code, why, after_queued=False):
        self.tunnel.session.reset_stream(self.stream_id, code, after_queued)
        self.tunnel.wake()
        self.kill()
        # Logged last, and never fatally: from the hub a contended log lock cannot be waited for.
        try:
            log.debug("%s stream=%d reset code=%s: %s", self.tunnel.label, self.stream_id,
                      wire.code_name(code), why)
        except Exception:
            pass

    def kill(self):
        """Abort locally (peer reset, or the tunnel ended): the local peer sees a reset."""
        if self._done:
            return
        self._done = True
        self._stop_watching()  # before the close: a watcher must not outlive its fd
        current = gevent.getcurrent()
        if self._down is not None and self._down is not current:
            self._down.kill(block=False)
        if self.sock is not None:
            self._flush_nowait()
            close_with_rst(self.sock)
        self.tunnel.buffered -= self.buffered  # whatever was not delivered is dropped
        self.buffered = 0
        self.tunnel.pumps.pop(self.stream_id, None)

    def _stop_watching(self):
        for watcher in (self._reader, self._writer):
            if watcher is not None:
                watcher.stop()

    def _flush_nowait(self):
        """Hand bytes that arrived before the reset to the kernel without waiting, so the local
        peer reads them before the RST, as TCP itself delivers data sent before a reset."""
        if self._sending or not self._connected:  # a half-sent chunk: the next would leave a gap
            return
        try:
            while self.buffer:
                chunk = self.buffer.popleft()
                sent = self.sock.send(chunk)
                self.tunnel.bytes_down += sent  # delivered too: the byte counters include it
                self._delivered(sent)
                if sent < len(chunk):
                    return
        except OSError:
            pass  # full or already broken: the RST follows regardless
