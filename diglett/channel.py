"""The channel between the master and one worker (diglett.workers): short text messages on a
unix SEQPACKET socketpair, each carrying at most one descriptor (SCM_RIGHTS).

A SEQPACKET socket keeps message boundaries and a descriptor travels with its message, so a
reader never has to frame or match them up. Messages:

- master -> worker: ``agents`` / ``tls`` / ``ws`` + an accepted connection; ``give?I?NAME``
  (worker I wants NAME's tunnel port); ``visitor:NAME`` + a visitor the port held, then
  ``door:NAME`` + the port, or without one (not moved)
- worker -> master: ``ready``, ``wake`` (a session change is committed: deliver it);
  ``door?GATEWAY?NAME`` (the session of our key on GATEWAY holds NAME's port: ask for it);
  ``visitor!I?NAME`` + a held visitor, then ``door!I?NAME`` + the port or none, for worker I
"""

import array

from gevent import socket

MESSAGE_MAX = 512  # bytes of one message: a kind and a subdomain (at most 63) or two
READY, WAKE = "ready", "wake"
_FD = array.array("i").itemsize


def send(channel, text, sock=None, wait=True):
    """Send ``text`` (and a copy of ``sock``'s descriptor); OSError if the peer is gone.
    ``wait=False``: BlockingIOError rather than wait while the peer's queue is full."""
    ancillary = []
    if sock is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", [sock.fileno()]).tobytes())]
    channel.sendmsg([text.encode()], ancillary, 0 if wait else socket.MSG_DONTWAIT)


def receive(channel):
    """(text, socket or None) of the next message; None when the channel closed."""
    data, ancillary, _flags, _address = channel.recvmsg(MESSAGE_MAX, socket.CMSG_SPACE(_FD * 4))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _FD])
    if not data and not fds:
        return None
    socks = [socket.socket(fileno=fd) for fd in fds]
    for extra in socks[1:]:  # never sent; a confused peer must not leak descriptors here
        extra.close()
    return data.decode(errors="replace"), (socks[0] if socks else None)
