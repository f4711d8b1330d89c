"""A byte stream inside a WebSocket (wsproto does the HTTP upgrade and the framing).

WebSocketStream offers what diglett.reach.splice needs, ``recv``/``sendall``/``close``, over a
connected socket or TLS socket, for both ends: the agent's ``connect`` and the gateway's
``accept``. diglett's bytes travel as binary messages whose boundaries mean nothing; pings are
answered here. A peer that is not a WebSocket client gets an HTTP error answer and a
WebSocketRefused naming what it sent.
"""

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECV_SIZE = 256 * 1024  # bytes per read of the underlying socket
MAX_UPGRADE = 16 * 1024  # an upgrade request or answer longer than this is refused
SUBPROTOCOL = "diglett"  # offered by the agent, accepted by the gateway when offered
NORMAL_CLOSURE = 1000


class WebSocketRefused(ConnectionError):
    """The upgrade did not happen: the message says what the peer sent."""


class WebSocketStream:
    def __init__(self, sock, connection):
        self.sock = sock
        self.ws = connection
        self._data = []  # payload received and not yet returned by recv
        self._closed = False  # the peer's close frame (or EOF) arrived

    # ----- the two ends -------------------------------------------------------------------
    @classmethod
    def connect(cls, sock, host, path):
        """The agent's end: upgrade ``sock`` at ``host`` + ``path``."""
        stream = cls(sock, WSConnection(ConnectionType.CLIENT))
        sock.sendall(stream.ws.send(Request(host=host, target=path,
                                            subprotocols=[SUBPROTOCOL])))
        event = stream._next_handshake_event()
        if isinstance(event, RejectConnection):
            raise WebSocketRefused("the gateway answered the WebSocket upgrade with HTTP %d "
                                   "(check the path and the proxy in front)" % event.status_code)
        if not isinstance(event, AcceptConnection):
            raise WebSocketRefused("unexpected answer to the upgrade: %s" % type(event).__name__)
        return stream

    @classmethod
    def accept(cls, sock, path):
        """The gateway's end: take an upgrade for ``path``, refuse anything else."""
        stream = cls(sock, WSConnection(ConnectionType.SERVER))
        try:
            event = stream._next_handshake_event()
        except WebSocketRefused as exc:
            stream._reject(400)
            raise WebSocketRefused("not a WebSocket upgrade: %s" % exc) from None
        if not isinstance(event, Request):
            raise WebSocketRefused("expected an upgrade request, got %s" % type(event).__name__)
        if event.target.split("?")[0] != path:
            stream._reject(404)
            raise WebSocketRefused("upgrade for path %r, not %r" % (event.target[:100], path))
        offered = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
        sock.sendall(stream.ws.send(AcceptConnection(subprotocol=offered)))
        return stream

    def _next_handshake_event(self):
        received = 0
        while True:
            try:
                for event in self.ws.events():
                    return event
            except RemoteProtocolError as exc:
                raise WebSocketRefused(str(exc)) from None
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise WebSocketRefused("connection closed during the upgrade")
            received += len(data)
            if received > MAX_UPGRADE:
                raise WebSocketRefused("upgrade longer than %d bytes" % MAX_UPGRADE)
            try:
                self.ws.receive_data(data)
            except RemoteProtocolError as exc:
                raise WebSocketRefused(str(exc)) from None

    def _reject(self, status):
        try:
            self.sock.sendall(self.ws.send(RejectConnection(status_code=status,
                                                            has_body=False)))
        except (OSError, LocalProtocolError):
            pass

    # ----- the byte stream ----------------------------------------------------------------
    def recv(self, size=RECV_SIZE):
        """Payload bytes (at most what arrived; ``size`` is a hint), or b"" at the end."""
        self._take_events()  # bytes that came with the upgrade, or after a short read
        while not self._data and not self._closed:
            data = self.sock.recv(RECV_SIZE)
            self.ws.receive_data(data or None)
            if not data:
                self._closed = True
            self._take_events()
        data = b"".join(self._data)
        self._data = []
        return data

    def _take_events(self):
        try:
            events = list(self.ws.events())
        except RemoteProtocolError as exc:
            raise ConnectionError("bad WebSocket frame: %s" % exc) from None
        for event in events:
            if isinstance(event, BytesMessage):
                self._data.append(bytes(event.data))
            elif isinstance(event, TextMessage):
                raise ConnectionError("text message on a diglett WebSocket")
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._closed = True
                self._send_quietly(event.response())
            elif isinstance(event, RejectData):
                pass

    def sendall(self, data):
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def close(self):
        if not self._closed:
            self._send_quietly(CloseConnection(code=NORMAL_CLOSURE))
        self.sock.close()

    def _send_quietly(self, event):
        try:
            self.sock.sendall(self.ws.send(event))
        except (OSError, LocalProtocolError):
            pass
