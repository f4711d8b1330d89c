"""One stream's bytes, both ways, between its local socket and the session (see Pump).

diglett.tunnel owns the agent connection and creates one Pump per stream; a Pump reaches the
session and the writer only through its tunnel.
"""

import collections
import logging
import socket
import time

import gevent

from diglett import wire
from diglett.sockets import (IOV_MAX, LINGER_OFF, close_with_rst, kernel_socket, sendall_buffers,
                             set_nodelay)
from diglett.wire import ErrorCode

log = logging.getLogger("diglett.tunnel")  # one logger for a session's story, as before

# Bytes read from a stream socket per recv (within credit): one DATA frame. recv(n) allocates
# n bytes before it reads, and from 128 KiB up glibc maps fresh pages for that (an mmap, page
# faults, then an mremap or munmap per read: ~20 us each on this VM, docs/benchmarks.md), where
# a smaller buffer comes from the heap and a short read shrinks it in place.
STREAM_RECV_MAX = wire.MAX_DATA_PAYLOAD
READ_PER_WAKE = 256 * 1024  # bytes a stream reads per readiness before the hub runs others


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
        self._kernel = None  # kernel_socket(sock): its recv and send never wait
        self._reader = self._writer = None  # io watchers of the local socket
        self._done = False
        self._sending = False  # the down greenlet is inside a send with a popped chunk
        self.buffered = 0  # bytes in self.buffer
        self.last_active = time.monotonic()  # last byte moved either way (idle timeout)
        self.last_to_local = False  # the last bytes moved went to the local socket

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
        self._kernel = kernel_socket(sock)
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
        recv = self._kernel.recv
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
            tunnel.send_soon()  # first: the peer waits for these bytes, not for the counters
            self.last_active = time.monotonic()
            self.last_to_local = False
            tunnel.bytes_up += len(data)
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
                sent = self._kernel.send(data)  # never waits
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
        self.last_to_local = True

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
