"""Hands the tunnel code a plain socket for a connection whose bytes live inside a WebSocket:
a socketpair, one end returned, the other relayed to and from the outer layer by two greenlets.

diglett.tunnel drives its socket with raw watchers, MSG_DONTWAIT scatter-gather writes and
zero timeouts, which a WebSocket cannot offer; the splice keeps every line of the tunnel and
handshake code the same, for one local copy per chunk. (TLS alone needs no splice:
diglett.reach.tls_socket gives the tunnel its calls directly.)
An end of either side ends the other: an EOF is passed on as an EOF, an error as a close.
"""

import logging

import gevent
from gevent import socket

log = logging.getLogger(__name__)

RELAY_SIZE = 256 * 1024  # bytes per read on either side
PAIR_BUFFER = 1024 * 1024  # socketpair buffers: room for a few TLS reads in flight


def splice(outer, label):
    """A socket standing for ``outer`` (anything with recv/sendall/close: a WebSocketStream).
    ``label`` names the connection in log lines."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, PAIR_BUFFER)
    gevent.spawn(_inward, outer, theirs, label)
    gevent.spawn(_outward, theirs, outer, label)
    return ours


def _inward(outer, theirs, label):
    """outer -> the tunnel's socket. The outer EOF becomes an EOF (a write shutdown), and the
    tunnel's own close then ends _outward; an outer error closes both sides at once."""
    try:
        while True:
            data = outer.recv(RELAY_SIZE)
            if not data:
                theirs.shutdown(socket.SHUT_WR)
                return
            theirs.sendall(data)
    except (OSError, ValueError) as exc:  # ssl errors are OSErrors; ValueError: closed
        log.debug("%s outer connection ended: %s", label, exc)
        _close(theirs, outer)


def _outward(theirs, outer, label):
    """The tunnel's socket -> outer; the tunnel's close (or a failure) ends both sides."""
    try:
        while True:
            data = theirs.recv(RELAY_SIZE)
            if not data:
                return
            outer.sendall(data)
    except (OSError, ValueError) as exc:
        log.debug("%s relay to the outer connection ended: %s", label, exc)
    finally:
        _close(theirs, outer)


def _close(theirs, outer):
    for sock in (outer, theirs):
        try:
            sock.close()
        except (OSError, ValueError):
            pass
