"""The status page at / in headless Chromium (Debian's chromium package), and its escaping.

The browser tests drive the page over the DevTools protocol on a pipe
(--remote-debugging-pipe: no port, no websocket library): the page's own refresh (a fetch of
api/tunnels every 2 s) runs in virtual time and the redrawn DOM is checked; the grants panel
lists the grants with their policy, and revoking one there (two clicks) removes the grant and
disconnects its agent. Screenshots stay in the test's tmp dir for a human to look at."""

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
import types

import pytest

from diglett import statusgrants, statuspage
from tests.support import harness
from tests.support.harness import Backend, Gateway, echo

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


DEVTOOLS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1200,800")
CDP_TIMEOUT = 20  # seconds for one DevTools answer
EXIT_REVOKED = 6
APR1 = "$apr1$diglett1$" + "b" * 22


class DevTools:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (answers out), each
    message JSON ended by a NUL byte."""

    def __init__(self, profile):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        # a tiny exec wrapper puts the pipes on fds 3 and 4 (dash cannot name fds above 9)
        wrapper = ("import os, sys; os.dup2(%d, 3); os.dup2(%d, 4); "
                   "os.execv(sys.argv[1], sys.argv[1:])" % (to_r, from_w))
        argv = [sys.executable, "-c", wrapper, CHROMIUM, *DEVTOOLS_FLAGS,
                "--user-data-dir=%s" % profile, "--remote-debugging-pipe",
                "about:blank"]  # headless Chromium with no page to show exits at once
        self._log = open(str(profile) + ".log", "wb")  # chromium's stderr, for a failure
        self.proc = subprocess.Popen(argv, pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_r)
        os.close(from_w)
        self._buffer = b""
        self._next = 0

    def send(self, method, params=None, session=None):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise AssertionError("%s: %s" % (method, answer["error"]))
                return answer["result"]

    def _read(self):
        deadline = time.monotonic() + CDP_TIMEOUT
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise AssertionError("no DevTools answer within %d s" % CDP_TIMEOUT)
            chunk = os.read(self._from, 1 << 16)
            if not chunk:
                raise AssertionError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url):
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]

    def evaluate(self, session, expression):
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True}, session)
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close")
        except AssertionError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to)
        os.close(self._from)
        self._log.close()


ROWS = "Array.from(document.querySelectorAll('#grants tr[data-subdomain]'))"
NAMES = ROWS + ".map(function (r) { return r.dataset.subdomain; }).join(',')"


@pytest.mark.timeout(120)
def test_the_status_page_lists_grants_and_revokes_one(tmp_path):
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed (./scripts/bootstrap --test installs it)")
    gw = Gateway(tmp_path / "gw").start()
    backend = Backend(echo)
    key_file, key = gw.new_key("webshop")
    gw.grant("webshop", key, "--basic-auth", "alice:" + APR1, "--alias", "shop.customer.test")
    _, other = gw.new_key("blog")
    gw.grant("blog", other, "--comment", "<b>not bold</b>")
    agent = gw.agent("webshop", backend.address, key_file=key_file)
    browser = DevTools(tmp_path / "chromium")
    try:
        page = browser.open("http://127.0.0.1:%d/" % gw.http_address[1])
        harness.wait_until(lambda: browser.evaluate(
            page, "Number((document.getElementById('grants') || {dataset: {}})"
                  ".dataset.refreshes || 0)") >= 1, 20, interval=0.2,
            what="the grants panel to refresh itself")
        assert browser.evaluate(page, NAMES) == "blog,webshop"
        text = browser.evaluate(page, "document.getElementById('grants').innerText")
        assert "alias=shop.customer.test auth=alice" in text and APR1 not in text
        assert "<b>not bold</b>" in text  # the comment shows as text, not markup

        button = "document.querySelector('#grants button[data-name=\"webshop\"]')"
        assert browser.evaluate(page, button + ".click() || " + button + ".textContent") == \
            "Really revoke?"  # the first click only arms it
        assert [g["subdomain"] for g in json.loads(gw.admin("grants", "--json").stdout)] == [
            "blog", "webshop"]
        browser.evaluate(page, button + ".click()")
        harness.wait_until(lambda: browser.evaluate(page, NAMES) == "blog", 20, interval=0.2,
                           what="the revoked grant to leave the page")
        assert browser.evaluate(page, "document.getElementById('grant-status').textContent") \
            == "revoked webshop"
    finally:
        browser.close()
        backend.close()
    assert [g["subdomain"] for g in json.loads(gw.admin("grants", "--json").stdout)] == ["blog"]
    assert agent.wait(15) == EXIT_REVOKED  # the server disconnected the agent
    audit = json.loads(gw.admin("audit", "--name", "webshop", "--json").stdout)
    assert audit[0]["action"] in ("revoke", "session-end") and any(
        e["action"] == "revoke" and e["actor"].startswith("http-api") for e in audit)


@pytest.mark.timeout(60)
def test_the_grants_panel_escapes_everything():
    grant = {"subdomain": "a&b", "key": '"><script>x</script>', "fingerprint": "<i>f</i>",
             "port": None, "comment": "<script>alert(1)</script>", "policy": {}}
    panel = statusgrants.render([grant])
    assert "<script>alert(1)</script>" not in panel and "<i>f</i>" not in panel
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in panel
    assert 'data-key="&quot;&gt;&lt;script&gt;' in panel
    assert "The registry cannot answer now." in statusgrants.render(None)
    assert "No grants." in statusgrants.render([])
