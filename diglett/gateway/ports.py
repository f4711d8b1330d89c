"""Tunnel ports: which local port a session's visitors connect to.

A grant's pinned port, else the name's last port when it is free (so a reconnecting agent
keeps its address), else a fresh one, random within ``[server] ports`` when set. Remembers
the last port of each name across restarts (read from the registry at start-up). Owns no
session and knows no grant beyond its ``port``.
"""

import random

from gevent import socket

ACCEPT_BACKLOG = 1024
PORT_ATTEMPTS = 64  # random ports tried in a configured range before giving up


class TunnelPorts:
    def __init__(self, config, last_ports=None):
        self.config = config  # replaced by the server on SIGHUP (ports and bind are read here)
        self.last = dict(last_ports or {})  # subdomain -> its last tunnel port

    def bind(self, name, grant):
        """A listening socket for ``name``; OSError when no port can be had."""
        host = self.config.bind
        if grant.port:
            return listen(host, grant.port)
        last = self.last.get(name)
        if last is not None and self._in_range(last):
            try:
                return listen(host, last)
            except OSError:
                pass
        if self.config.ports is None:
            return listen(host, 0)
        low, high = self.config.ports
        for _ in range(PORT_ATTEMPTS):
            try:
                return listen(host, random.randint(low, high))
            except OSError:
                continue
        for port in range(low, high + 1):  # small ranges: try them all before failing
            try:
                return listen(host, port)
            except OSError:
                continue
        raise OSError("no free port in %d-%d" % (low, high))

    def remember(self, name, port):
        self.last[name] = port

    def _in_range(self, port):
        ports = self.config.ports
        return ports is None or ports[0] <= port <= ports[1]


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen(host, port, backlog=ACCEPT_BACKLOG):
    sock = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
