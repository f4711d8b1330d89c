"""The reach layers in one process over socketpairs: the proxy handshakes against scripted
proxies, the WebSocket stream between its two ends, and the splice that hides them."""

import base64
import hashlib
import os

import gevent
import h11
import pytest
from gevent import socket
from wsproto.events import Ping, Pong

from diglett.reach import proxy, proxy_handshake
from diglett.reach.proxy_handshake import ProxyFailed, ProxyRefused
from diglett.reach.splice import splice
from diglett.reach.websocket import WebSocketRefused, WebSocketStream
from diglett.sockets import recv_exact

pytestmark = pytest.mark.timeout(10)


def fake_http_proxy(sock, status, reason=b"", close_early=False):
    """Read one CONNECT with h11; answer ``status`` (or close); return its headers."""
    server = h11.Connection(h11.SERVER)
    while True:
        event = server.next_event()
        if event is h11.NEED_DATA:
            server.receive_data(sock.recv(4096))
            continue
        break
    if close_early:
        sock.close()
        return event
    sock.sendall(server.send(h11.Response(status_code=status, reason=reason,
                                          headers=[("Content-Length", "0")])))
    return event


def connect_through(url, status=200, reason=b"OK", close_early=False):
    ours, theirs = socket.socketpair()
    answer = gevent.spawn(fake_http_proxy, theirs, status, reason, close_early)
    try:
        proxy_handshake.open_tunnel(ours, proxy.parse(url), "gw.example.com", 443)
        return answer.get(timeout=5)
    finally:
        answer.join(5)
        ours.close()


def test_connect_sends_the_target_and_basic_credentials():
    request = connect_through("http://alice:s3cret@proxy:3128")
    assert (request.method, request.target) == (b"CONNECT", b"gw.example.com:443")
    headers = dict(request.headers)
    assert headers[b"host"] == b"gw.example.com:443"
    assert headers[b"proxy-authorization"] == b"Basic " + base64.b64encode(b"alice:s3cret")


def test_a_refused_connect_carries_the_proxys_answer():
    with pytest.raises(ProxyRefused, match="refused to connect to gw.example.com:443: "
                                           "403 Forbidden"):
        connect_through("http://proxy:3128", 403, b"Forbidden")
    with pytest.raises(ProxyRefused, match="407 Proxy Authentication Required .the proxy "
                                           "wants credentials"):
        connect_through("http://proxy:3128", 407, b"Proxy Authentication Required")


def test_a_proxy_that_closes_mid_handshake_is_a_clear_connection_error():
    with pytest.raises(ProxyFailed, match="closed the connection before answering CONNECT"):
        connect_through("http://proxy:3128", close_early=True)


def fake_socks5(sock, reply=0):
    assert recv_exact(sock, 3) == b"\x05\x01\x02"  # one method offered: user/password
    sock.sendall(b"\x05\x02")
    version, size = recv_exact(sock, 2)
    user = recv_exact(sock, size)
    password = recv_exact(sock, recv_exact(sock, 1)[0])
    sock.sendall(b"\x01\x00")
    head = recv_exact(sock, 5)  # VER CMD RSV ATYP=name LEN
    name = recv_exact(sock, head[4])
    port = int.from_bytes(recv_exact(sock, 2), "big")
    sock.sendall(bytes([5, reply, 0, 1, 127, 0, 0, 1, 0, 80]))
    return user, password, name, port


def test_socks5h_logs_in_and_sends_the_name():
    ours, theirs = socket.socketpair()
    served = gevent.spawn(fake_socks5, theirs)
    proxy_handshake.open_tunnel(ours, proxy.parse("socks5h://bob:pw@s:1080"), "gw.example.com",
                                443)
    assert served.get(timeout=5) == (b"bob", b"pw", b"gw.example.com", 443)
    ours, theirs = socket.socketpair()
    gevent.spawn(fake_socks5, theirs, 2)
    with pytest.raises(ProxyRefused, match="SOCKS reply 2 .connection not allowed by ruleset"):
        proxy_handshake.open_tunnel(ours, proxy.parse("socks5h://bob:pw@s:1080"), "gw", 443)


def websocket_pair(path="/diglett"):
    client_sock, server_sock = socket.socketpair()
    accepting = gevent.spawn(WebSocketStream.accept, server_sock, path)
    client = WebSocketStream.connect(client_sock, "gw.example.com", "/diglett")
    return client, accepting.get(timeout=5)


def test_websocket_carries_bytes_both_ways_and_answers_pings():
    client, server = websocket_pair()
    payload = os.urandom(300_000)
    sender = gevent.spawn(lambda: [client.sendall(payload[i:i + 7000])
                                   for i in range(0, len(payload), 7000)])
    received = b""
    while len(received) < len(payload):
        received += server.recv()
    sender.get(timeout=5)
    assert received == payload
    server.sendall(b"down")
    assert client.recv() == b"down"
    # a ping from the peer is answered by the stream itself
    server.sock.sendall(server.ws.send(Ping(payload=b"p")))
    gevent.spawn(client.recv)
    gevent.sleep(0.1)
    server.ws.receive_data(server.sock.recv(100))
    assert [type(e) for e in server.ws.events()] == [Pong]
    client.close()
    assert server.recv() == b""  # a close frame is the end of the stream


def test_a_plain_http_request_on_the_websocket_path_is_answered_and_refused():
    client_sock, server_sock = socket.socketpair()
    client_sock.sendall(b"GET /diglett HTTP/1.1\r\nHost: gw\r\n\r\n")
    with pytest.raises(WebSocketRefused, match="not a WebSocket upgrade"):
        WebSocketStream.accept(server_sock, "/diglett")
    assert client_sock.recv(100).startswith(b"HTTP/1.1 400 ")


def test_an_upgrade_for_another_path_gets_404():
    client_sock, server_sock = socket.socketpair()
    accepting = gevent.spawn(WebSocketStream.accept, server_sock, "/diglett")
    with pytest.raises(WebSocketRefused, match="HTTP 404"):
        WebSocketStream.connect(client_sock, "gw", "/other")
    with pytest.raises(WebSocketRefused, match="upgrade for path '/other'"):
        accepting.get(timeout=5)


def test_splice_hides_the_websocket_from_the_tunnel_code():
    client, server = websocket_pair()
    agent_side, gateway_side = splice(client, "test"), splice(server, "test")
    payload = os.urandom(2_000_000)
    sender = gevent.spawn(agent_side.sendall, payload)
    digest, total = hashlib.sha256(), 0
    while total < len(payload):
        chunk = gateway_side.recv(65536)
        digest.update(chunk)
        total += len(chunk)
    sender.get(timeout=5)
    assert digest.digest() == hashlib.sha256(payload).digest()
    gateway_side.sendall(b"reply")
    assert agent_side.recv(100) == b"reply"
    agent_side.close()  # the tunnel's close ends the outer connection and the far side sees EOF
    assert gateway_side.recv(100) == b""


def test_a_proxy_that_cannot_reach_the_gateway_is_retried_not_refused():
    with pytest.raises(ProxyFailed, match="could not reach gw.example.com:443: 502 Bad Gateway"):
        connect_through("http://proxy:3128", 502, b"Bad Gateway")
