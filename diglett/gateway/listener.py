"""The agent port: accept, admit or reject before any handshake, hand off to a greenlet.

The accept loop never does work that waits on a peer: admission is a counter check, a
rejection is written by its own greenlet, and every admitted connection runs ``handle`` in
a greenlet of its own, whose failures are its own (style habit 4).

A worker (diglett.workers) has no socket of its own: the master accepts, and the connections
it passes on go through ``serve``, the same admission and handler as accepted ones.
"""

import logging

import gevent

from diglett import admission, wire
from diglett.gateway.ports import listen
from diglett.wire import RejectCode

log = logging.getLogger(__name__)


class AgentListener:
    def __init__(self, address, admission_control, handle, inherited=None, bind=True):
        """``bind=False``: no socket; connections arrive through ``serve`` (a worker)."""
        self.admission = admission_control
        self.handle = handle  # (sock, address, source) -> None, in its own greenlet
        self.sock = None
        self.address = tuple(address)
        if bind:
            self.sock = inherited if _serves(inherited, address) else listen(*address)
            self.address = self.sock.getsockname()[:2]
        self.closed = False
        self._loop = None

    def start(self):
        if self.sock is not None:
            self._loop = gevent.spawn(self._accept_loop)

    def close(self):
        self.closed = True
        if self._loop is not None:
            self._loop.kill()
        if self.sock is not None:
            self.sock.close()

    def serve(self, sock, address):
        """Admit a connection accepted here or passed by the master, and handle it."""
        if self.closed:
            sock.close()  # stopping: the agent reconnects to the next run
            return
        source = admission.source_of(address)
        refusal = self.admission.admit(source)
        if refusal is not None:
            log.info("agent=%s:%d refused before handshake: %s", address[0], address[1],
                     refusal)
            gevent.spawn(reject_and_close, sock, RejectCode.BUSY)
            return
        gevent.spawn(self.handle, sock, address, source)

    def _accept_loop(self):
        while True:
            try:
                sock, address = self.sock.accept()
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                gevent.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            self.serve(sock, address)


def _serves(sock, address):
    """Whether a socket passed from the last run listens on the configured address (a
    changed ``listen`` binds anew, and the old socket goes)."""
    if sock is None:
        return False
    host, port = sock.getsockname()[:2]
    if host == address[0] and port == address[1] or address[1] == 0 and host == address[0]:
        return True
    log.info("fd store: the agent port passed on listens on %s:%d, not on %s:%d: closing it",
             host, port, *address)
    sock.close()
    return False


def reject_and_close(sock, code):
    try:
        sock.sendall(wire.encode_reject(code))
    except OSError:
        pass
    sock.close()
