"""Hand-made protocol peers for the test plan: a test agent that talks to the real server, and a
test server that the real agent dials, both built on diglett's sans-IO modules.

They speak the protocol correctly unless told not to, so a test can put one bad frame, record or
act exactly where it wants it and watch what the real program does. Sockets are blocking, on
127.0.0.1 only, and every read has a deadline.
"""

import socket
import time

from diglett import crypto, noise, protocol, wire
from diglett.noise import ACT_TWO_SIZE, PUBLIC_KEY_SIZE
from diglett.wire import FrameType

CLOSED_EOF, CLOSED_RESET, STILL_OPEN = "eof", "reset", "open"


def recv_exact(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(data), size))
        data += chunk
    return bytes(data)


def frame(ftype, stream_id=0, payload=b""):
    """One frame's bytes, without the encoder's checks (so bad frames can be made too)."""
    return (bytes([int(ftype), 0]) + stream_id.to_bytes(4, "big") + len(payload).to_bytes(2, "big")
            + payload)


def raw_record(cipher, plaintext):
    """A sealed record of any length, 0 included (TransportCipher.seal refuses L = 0)."""
    if plaintext:
        return cipher.seal(plaintext)
    aead, key, nonce = cipher._aead, cipher._key, cipher.nonce
    record = aead.seal(key, nonce, b"", b"\x00\x00") + aead.seal(key, nonce + 1, b"", b"")
    cipher._advance(nonce + 2)
    return record


class Impostor(noise.Initiator):
    """An initiator that claims ``claimed_pub`` in act three but proves it with its own scalar
    (it does not hold the claimed key: the se DH cannot match)."""

    def __init__(self, own_key, claimed_pub, *args, **kwargs):
        super().__init__(own_key, *args, **kwargs)
        self._claimed = bytes(claimed_pub)

    def read_act_two(self, data):
        self._expect(noise._MIDDLE, "read_act_two")
        data = self._check_act(data, ACT_TWO_SIZE, "act2")
        remote_ephemeral = data[1:1 + PUBLIC_KEY_SIZE]
        self._mix_hash(remote_ephemeral)
        temp_key = self._mix_key(self._ephemeral, remote_ephemeral)
        self._decrypt_and_hash(temp_key, 0, data[1 + PUBLIC_KEY_SIZE:], "act2 bad tag")
        encrypted_static = self._encrypt_and_hash(temp_key, 1, self._claimed)
        final_key = self._mix_key(self._static, remote_ephemeral)
        tag = self._aead.seal(final_key, 0, self._h, b"")
        self._finish(initiator=True)
        return b"\x00" + encrypted_static + tag


class _Peer:
    """What both hand-made peers share: reading events, and waiting for one."""

    def poll(self, timeout):
        """Read what arrives within ``timeout`` s into events; returns CLOSED_EOF, CLOSED_RESET
        or STILL_OPEN. ``_answer`` then replies (PONGs, credit) as the peer's role wants."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            return STILL_OPEN
        except ConnectionResetError:
            return CLOSED_RESET
        if not data:
            return CLOSED_EOF
        new = self.session.receive_data(data)
        self.events += new
        self._answer(new)
        return STILL_OPEN

    def wait_for(self, predicate, timeout):
        """The first event (old or new) matching ``predicate``; AssertionError on timeout or
        close."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching event within %s s: %r" % (timeout,
                                                                             self.events[-5:]))
            state = self.poll(min(left, 0.5))
            if state != STILL_OPEN:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                raise AssertionError("connection %s before a matching event: %r" % (
                    state, self.events[-5:]))



class TestAgent(_Peer):
    """An agent in the test process. ``preamble`` is what goes on the wire; the prologue is
    built from ``prologue_preamble`` (default: the same bytes), so a relay-style rewrite can be
    imitated. ``handshake_class`` may be Impostor (with ``claimed_pub``)."""

    __test__ = False  # not a pytest class

    def __init__(self, address, server_key_hex, private_key, *, source=None, timeout=10,
                 preamble=None, prologue_preamble=None, claimed_pub=None):
        self.sock = socket.create_connection(tuple(address), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.preamble = preamble or wire.encode_preamble()
        prologue = wire.prologue(prologue_preamble or self.preamble)
        server_key = bytes.fromhex(server_key_hex)
        if claimed_pub is not None:
            self.handshake = Impostor(private_key, claimed_pub, server_key, prologue)
        else:
            self.handshake = noise.Initiator(private_key, server_key, prologue)
        self.session = None
        self.events = []
        self.reject = None

    # ----- handshake and login ----------------------------------------------------------
    def start(self):
        """Preamble, act one, act two, act three. Returns the reject code if the server sent
        a reject instead of act two, else None (then the session is ready for CONFIG)."""
        self.sock.sendall(self.preamble + self.handshake.act_one())
        first = recv_exact(self.sock, 1)
        if first == wire.MAGIC[:1]:
            self.reject = wire.parse_reject(first + recv_exact(self.sock, wire.PREAMBLE_SIZE - 1))[1]
            return self.reject
        act_three = self.handshake.read_act_two(first + recv_exact(self.sock, ACT_TWO_SIZE - 1))
        self.sock.sendall(act_three)
        self.session = protocol.Session(protocol.AGENT, self.handshake.send_cipher,
                                        self.handshake.recv_cipher)
        return None

    def login(self, name, extra=None, timeout=10):
        """Send CONFIG for ``name``; returns the first answer event (Accepted, Refused, GoAway)."""
        config = {"subdomain": name, "agent": "diglett/test-peer", "features": []}
        config.update(extra or {})
        self.session.send_config(config)
        self.flush()
        return self.wait_for(lambda e: isinstance(e, (protocol.Accepted, protocol.Refused,
                                                      protocol.GoAwayReceived)), timeout)

    # ----- records ------------------------------------------------------------------------
    @property
    def send_cipher(self):
        return self.handshake.send_cipher

    def flush(self):
        data = self.session.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_plaintext(self, plaintext):
        """One record with exactly this plaintext (which may hold bad frames)."""
        self.sock.sendall(raw_record(self.send_cipher, plaintext))

    def send_frames(self, *frames):
        self.send_plaintext(b"".join(frames))

    def _answer(self, new):
        """Return credit for what arrived, and send the PONGs the session queued."""
        for event in new:
            if isinstance(event, protocol.DataReceived):
                self.session.acknowledge(event.stream_id, len(event.data))
        try:
            self.flush()
        except OSError:
            pass

    def until_closed(self, timeout):
        """Read until the server closes; returns (how it closed, seconds it took). Bytes that
        do not decrypt or parse end the reading too (reported as 'garbage')."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            try:
                state = self.poll(min(0.5, deadline - time.monotonic()))
            except wire.ProtocolError:
                return "garbage", time.monotonic() - started
            if state != STILL_OPEN:
                return state, time.monotonic() - started
        return STILL_OPEN, time.monotonic() - started

    def goaways(self):
        return [e for e in self.events if isinstance(e, protocol.GoAwayReceived)]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def login(gateway, key_file, name, **kwargs):
    """A TestAgent logged in as ``name`` with the key in ``key_file``; returns (agent, answer)."""
    agent = TestAgent(gateway.agent_address, gateway.key, crypto.read_private_key(key_file),
                      **kwargs)
    assert agent.start() is None, "the server sent reject %r" % agent.reject
    return agent, agent.login(name)


class TestServer(_Peer):
    """A one-connection diglett server in the test process, for the real agent to dial.

    ``accept()`` waits for the agent, runs the responder side of the handshake, reads CONFIG
    and answers OK; the test then drives ``session`` (open streams, send frames) and pumps.
    """

    __test__ = False

    def __init__(self, window=256 * 1024):
        self.key = crypto.generate_private_key()
        self.key_hex = crypto.public_hex(self.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.window = window
        self.sock = None
        self.session = None
        self.events = []
        self.config = None

    @property
    def gateway(self):
        return "%s:%d" % self.address

    def accept(self, timeout=15, port=40000):
        self.listener.settimeout(timeout)
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(timeout)
        preamble = recv_exact(self.sock, wire.PREAMBLE_SIZE)
        responder = noise.Responder([self.key], wire.prologue(preamble))
        self.sock.sendall(responder.read_act_one(recv_exact(self.sock, noise.ACT_ONE_SIZE)))
        responder.read_act_three(recv_exact(self.sock, noise.ACT_THREE_SIZE))
        self.session = protocol.Session(protocol.SERVER, responder.send_cipher,
                                        responder.recv_cipher, window=self.window)
        while not self.events:
            self.events += self.session.receive_data(self.sock.recv(65536))
        self.config = self.events.pop(0).config
        self.session.accept({"subdomain": self.config["subdomain"], "host": "t.example.test",
                             "port": port, "window": self.window, "max_streams": 100,
                             "ping_interval": 10, "features": [], "server": "test"})
        self.flush()
        return self.config

    def flush(self):
        data = self.session.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_frames(self, *frames):
        self.sock.sendall(self.session._send_cipher.seal(b"".join(frames)))

    def _answer(self, new):
        self.flush()

    def close(self):
        for sock in (self.sock, self.listener):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass


__all__ = ["TestAgent", "TestServer", "Impostor", "frame", "raw_record", "login",
           "CLOSED_EOF", "CLOSED_RESET", "STILL_OPEN", "FrameType"]
