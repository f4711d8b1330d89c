"""A controllable TCP relay to put between an agent and a server in end-to-end fault tests.

Modes (switch at any time, from any thread):

* ``pass``: forward both ways.
* ``blackhole``: stop forwarding both ways but keep every socket open, as when a network path
  silently drops packets. The relay stops reading, so nothing is lost and nothing is closed.
  New connections are accepted and closed at once, so a redialling agent fails fast (as on a
  refused connect) instead of waiting out its connect timeout; this keeps backoff visible.
* ``close``: reset every current connection and close new ones at once.

Everything runs in daemon threads of the test process and binds 127.0.0.1:0.
"""

import socket
import struct
import threading

PASS, BLACKHOLE, CLOSE = "pass", "blackhole", "close"
POLL = 0.05  # seconds a paused pump sleeps between looks at the mode
CHUNK = 65536


class FaultRelay:
    def __init__(self, target):
        self.target = tuple(target)
        self.mode = PASS
        self.accepted = 0  # connections accepted, forwarded or not
        self.forwarded = 0  # connections forwarded to the target
        self._passing = threading.Event()
        self._passing.set()
        self._lock = threading.Lock()
        self._pairs = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def gateway(self):
        return "%s:%d" % self.address

    # ----- control --------------------------------------------------------------------
    def passthrough(self):
        self.mode = PASS
        self._passing.set()

    def blackhole(self):
        self._passing.clear()
        self.mode = BLACKHOLE

    def cut(self):
        """Reset every current connection; new ones are closed until passthrough()."""
        self._passing.clear()
        self.mode = CLOSE
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                abort(sock)

    def close(self):
        self.cut()
        abort(self.listener)

    # ----- threads --------------------------------------------------------------------
    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode != PASS:
                abort(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                abort(client)
                continue
            server.settimeout(None)
            self.forwarded += 1
            with self._lock:
                self._pairs.append((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _hold(self):
        """Wait while the relay is dark; False once it was cut meanwhile."""
        while not self._passing.wait(POLL):
            if self.mode == CLOSE:
                return False
        return True

    def _pump(self, source, sink):
        try:
            while self._hold():
                data = source.recv(CHUNK)
                if not self._hold():  # went dark mid-read: hold the bytes, or drop them if cut
                    break
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            self._hold()  # a dark path hides a reset too: the other end learns after restore
        abort(source)
        abort(sink)

def abort(sock):
    """Reset a socket another thread may be blocked on (close alone would not wake it)."""
    for action in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0)),
                   lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            action()
        except OSError:
            pass
