"""Test plan E (data integrity), the parts the older tests leave open, end to end on loopback.

Both sides half-closing at once with data still queued both ways, a backend process killed
with SIGKILL mid-download, and key rotation under load (a hand-made agent counts the records and rotations of the real server).
"""

import hashlib
import socket
import sys
import threading
import time

import pytest

from diglett import protocol
from tests import harness
from tests.harness import Backend, connect, recv_sha256, seeded_sha256, send_seeded, wait_until
from tests.plan_peer import login

MiB = 1 << 20


# ----- E2 (c): both sides half-close at once, data queued both ways ---------------------------
@pytest.mark.timeout(40)
def test_simultaneous_half_close_with_data_queued_both_ways(gateway):
    size = 4 * MiB
    start = threading.Barrier(2, timeout=10)
    backend_result = {}

    def handler(sock):
        sender = threading.Thread(target=lambda: (start.wait(), send_seeded(sock, size, b"down"),
                                                  sock.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        backend_result["digest"] = recv_sha256(sock, size)
        backend_result["eof"] = sock.recv(1) == b""
        sender.join(20)

    backend = Backend(handler)
    try:
        agent = gateway.agent("both", backend.address)
        with connect(agent.port, timeout=20) as sock:
            uploader = threading.Thread(target=lambda: (start.wait(), send_seeded(sock, size,
                                                                                    b"up"),
                                                        sock.shutdown(socket.SHUT_WR)),
                                        daemon=True)
            uploader.start()
            assert recv_sha256(sock, size) == seeded_sha256(size, b"down")
            assert sock.recv(1) == b"", "FIN did not follow the data"
            uploader.join(20)
        wait_until(lambda: "eof" in backend_result, 10, what="the backend's end")
        assert backend_result == {"digest": seeded_sha256(size, b"up"), "eof": True}
        wait_until(lambda: gateway.http_get("/debug/stats")["streams"] == 0, 5,
                   what="the stream to be closed on the server")
    finally:
        backend.close()


# ----- E3: an abort is never a clean EOF ------------------------------------------------------
BACKEND_PROCESS = r"""
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
sock, _ = listener.accept()
block = bytes(range(256)) * 256
while True:
    sock.sendall(block)
"""


@pytest.mark.timeout(30)
def test_backend_process_killed_mid_download_is_not_a_clean_eof(gateway, tmp_path):
    backend = harness.Proc([sys.executable, "-c", BACKEND_PROCESS], tmp_path, "backend")
    port = int(backend.wait_for(r"^(\d+)$", timeout=10, stream="stdout").group(1))
    agent = gateway.agent("dl", ("127.0.0.1", port))
    with connect(agent.port, timeout=10) as sock:
        # Bytes the backend never reads: a killed process with unread bytes resets its
        # connections. (With nothing unread the kernel closes with a plain FIN, which no
        # proxy can tell from a complete reply.)
        sock.sendall(b"unread" * 100)
        harness.recv_exact(sock, 2 * MiB)
        backend.kill()
        received = 0
        with pytest.raises(OSError):
            while data := sock.recv(262144):
                received += len(data)
            pytest.fail("clean EOF %d bytes after the backend was killed" % received)
    assert agent.popen.poll() is None


# ----- E5: key rotation under load ------------------------------------------------------------
@pytest.mark.timeout(90)
def test_key_rotation_under_load_many_records_each_way(gateway, echo_backend):
    """50 streams of small writes through the real server to a hand-made agent that echoes:
    both directions cross many 1000-nonce key rotations, every stream's bytes come back intact,
    and the rotation counts match the sans-IO model (records * 2 // 1000)."""
    streams, writes, size = 50, 1400, 40  # 50 x 1400 writes of 40 bytes, each way
    key_file, public = gateway.new_key("rot")
    gateway.grant("rot", public)
    peer, answer = login(gateway, key_file, "rot")
    assert isinstance(answer, protocol.Accepted)
    port = answer.info["port"]
    session = peer.session
    clients = [connect(port, timeout=20) for _ in range(streams)]
    payloads = [hashlib.sha256(b"%d" % n).digest()[:size // 4] * 4 for n in range(streams)]
    got = {n: hashlib.sha256() for n in range(streams)}
    counts = {n: 0 for n in range(streams)}
    by_stream = {}

    def client_writer(number):
        for _ in range(writes):
            clients[number].sendall(payloads[number])
            time.sleep(0.001)  # Nagle is off: most writes become their own record

    def client_reader(number):
        total = writes * size
        got[number] = recv_sha256(clients[number], total)

    threads = [threading.Thread(target=f, args=(n,), daemon=True)
               for n in range(streams) for f in (client_writer, client_reader)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    total = streams * writes * size
    echoed = 0
    while echoed < total and time.monotonic() < deadline:
        peer.poll(0.2)
        for event in peer.events:
            if isinstance(event, protocol.StreamOpened):
                by_stream[event.stream_id] = event
            elif isinstance(event, protocol.DataReceived):
                # echo in small frames, one record each: many records server-bound too
                session.send_data(event.stream_id, bytes(event.data))
                echoed += len(event.data)
                peer.flush()
            elif isinstance(event, protocol.GoAwayReceived):
                pytest.fail("the server ended the session: %r" % (event,))
        peer.events.clear()
    for thread in threads:
        thread.join(20)
    expected = {n: hashlib.sha256(payloads[n] * writes).hexdigest() for n in range(streams)}
    assert got == expected, "bytes differ after crossing the key rotations"
    records_in, records_out = session.records_in, session.records_out
    rotations_in, rotations_out = peer.handshake.recv_cipher.rotations, \
        peer.handshake.send_cipher.rotations
    print("records server->agent %d (rotations %d), agent->server %d (rotations %d)"
          % (records_in, rotations_in, records_out, rotations_out))
    assert rotations_in == records_in * 2 // 1000 and rotations_out == records_out * 2 // 1000
    assert records_in >= 10000 and records_out >= 10000, (records_in, records_out)
    assert gateway.http_get("/debug/stats")["agents"] == 1
    for sock in clients:
        sock.close()
    peer.close()
