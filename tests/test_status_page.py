"""The status page at / in headless Chromium (Debian's chromium package), and its escaping.

The browser test opens the page of a server with a connected agent, lets the page's own
refresh (a fetch of api/tunnels every 2 s) run in virtual time, and checks the redrawn DOM;
the screenshot stays in the test's tmp dir (its path is printed) for a human to look at.
"""

import re
import shutil
import subprocess
import types

import pytest

from diglett import statuspage
from tests import harness

pytestmark = pytest.mark.timeout(90)

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1200,800",
                  "--virtual-time-budget=3000")  # > one refresh period of the page


def chromium(tmp_path, label, *args):
    profile = tmp_path / ("chromium-" + label)
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, "--user-data-dir=%s" % profile, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(scripts/bootstrap --test installs it: apt-get install chromium)")
def test_status_page_shows_a_connected_tunnel(tmp_path, gateway, echo_backend):
    agent = gateway.agent("webshop", echo_backend.address)
    with harness.connect(agent.port) as sock:  # some traffic, and a stream left open
        sock.sendall(b"x" * 5000)
        harness.recv_exact(sock, 5000)
        url = "http://127.0.0.1:%d/" % gateway.http_address[1]

        screenshot = tmp_path / "status.png"
        chromium(tmp_path, "shot", "--screenshot=%s" % screenshot, url)
        assert screenshot.stat().st_size > 5000
        print("status page screenshot: %s" % screenshot)

        dom = chromium(tmp_path, "dom", "--dump-dom", url)
    refreshes = re.search(r'id="updated"[^>]*data-refreshes="(\d+)"', dom) or re.search(
        r'data-refreshes="(\d+)"[^>]*id="updated"', dom)
    assert refreshes and int(refreshes.group(1)) >= 1, "the page never refreshed itself:\n" + dom
    table = re.search(r'<tbody id="tunnels">(.*?)</tbody>', dom, re.S).group(1)
    assert "webshop.example.test" in table
    assert ">%d<" % agent.port in table
    assert "4.9 KiB" in table and "1 open / 1" in table  # redrawn from api/tunnels
    assert "live, updated" in dom


def test_status_page_escapes_everything():
    server = types.SimpleNamespace(config=types.SimpleNamespace(domain="example.test"),
                                   agent_port="<20000>")
    tunnel = {"subdomain": "a&b", "public_host": "<b>x</b>.example.test", "port": 1,
              "fingerprint": "\"'", "remote": "<script>alert(1)</script>",
              "started": "2026-01-02T03:04:05.678Z", "bytes_in": 1, "bytes_out": 2048,
              "streams_open": 0, "streams_opened": 3}
    page = statuspage.render(server, [tunnel], now=0)
    body = page.split("<script>")[0]  # the page's own script comes last
    assert "<b>x" not in body and "&lt;b&gt;x&lt;/b&gt;.example.test" in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert 'data-subdomain="a&amp;b"' in body and "&quot;&#x27;" in body
    assert "&lt;20000&gt;" in body and "2.0 KiB" in body
    assert page.count("<script>") == 1


def test_status_page_without_tunnels():
    server = types.SimpleNamespace(config=types.SimpleNamespace(domain="example.test"),
                                   agent_port=20000)
    assert "No tunnel connected." in statuspage.render(server, [])
