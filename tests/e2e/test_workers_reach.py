"""With ``workers = 2`` the tls:// and ws:// listeners are the master's too: it accepts there
and a worker takes the connection off its outer layer, so agents on every transport spread
over the workers and their bytes arrive intact. Real server, agents and backend on 127.0.0.1.
"""

import socket

import pytest

from tests.support import harness
from tests.support.reachfixtures import reach_gateway, start_agent

SIZE = 2 << 20  # bytes each way per agent


@pytest.fixture
def digest_backend():
    backend = harness.Backend(harness.digest_then_reply(SIZE))
    yield backend
    backend.close()


@pytest.mark.timeout(90)
def test_agents_over_tcp_tls_and_ws_land_on_both_workers(tmp_path, digest_backend):
    gw = reach_gateway(tmp_path / "gw", workers=2, gateway_id="gw")
    urls = {"over-tls": "tls://127.0.0.1:%d" % gw.tls_port,
            "over-ws": "ws://127.0.0.1:%d/diglett" % gw.ws_port,
            "over-tcp": gw.gateway, "over-tls2": "tls://127.0.0.1:%d" % gw.tls_port}
    agents = {name: start_agent(gw, name, url, digest_backend.address,
                                extra=["--proxy", "none"]) for name, url in urls.items()}
    for agent in agents.values():
        with harness.connect(agent.port, timeout=30) as sock:
            harness.send_pattern(sock, SIZE, b"up")
            sock.shutdown(socket.SHUT_WR)
            assert harness.recv_exact(sock, 32).hex() == harness.sha256_of_pattern(SIZE, b"up")
            assert harness.recv_all(sock) == (harness.sha256_of_pattern(SIZE, b"reply"), SIZE)
    placed = {t["subdomain"]: t["worker"] for t in gw.http_get("/api/tunnels")}
    assert placed == {"over-tls": 0, "over-ws": 1, "over-tcp": 0, "over-tls2": 1}
    assert "Traceback" not in gw.proc.stderr()
