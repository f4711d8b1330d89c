"""SIGHUP re-reads the config: hooks and limits change, tunnels and transfers stay up."""

import hashlib
import signal
import socket
import threading
import time

import pytest

from tests.support import harness

SIZE = 100 * 1024 * 1024


def recorder_script(path, log):
    path.write_text("#!/bin/sh\necho \"$DIGLETT_EVENT $DIGLETT_SUBDOMAIN\" >> %s\n" % log)
    path.chmod(0o755)


@pytest.mark.timeout(90)
def test_sighup_applies_hook_config_while_a_100_mib_transfer_finishes(tmp_path):
    script, events = tmp_path / "hook.sh", tmp_path / "events.log"
    recorder_script(script, events)
    gateway = harness.Gateway(tmp_path / "gw").start()
    backend = harness.Backend(lambda sock: (harness.send_pattern(sock, SIZE, b"big"),
                                            sock.shutdown(socket.SHUT_WR)))
    try:
        agent = gateway.agent("big", backend.address)
        client = harness.connect(agent.port, timeout=30)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        result = {}

        def read_slowly():
            digest, total = hashlib.sha256(), 0
            while True:
                data = client.recv(65536)
                if not data:
                    break
                digest.update(data)
                total += len(data)
                time.sleep(0.002)  # keep the transfer running across the reload
            result.update(digest=digest.hexdigest(), size=total)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        time.sleep(0.5)
        with open(gateway.config_path, "a") as config:
            config.write("\n[hooks]\nenabled = script\n\n[hook:script]\ncommand = %s\n" % script)
        gateway.proc.signal(signal.SIGHUP)
        gateway.proc.wait_for(r"reload: hooks now script", 10)
        assert reader.is_alive(), "the reload must happen while the transfer runs"
        other = gateway.agent("other", backend.address)  # the new hook sees a new session
        harness.wait_until(lambda: events.exists() and "connect other" in events.read_text(),
                           10, what="the reloaded script hook to run")
        reader.join(60)
        assert result["size"] == SIZE
        assert result["digest"] == harness.sha256_of_pattern(SIZE, b"big")
        assert agent.popen.poll() is None and "tunnel up" in agent.stdout()
        assert agent.stdout().count("tunnel up") == 1, "the tunnel never dropped"
        assert other.port
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_sighup_changes_limits_and_says_what_needs_a_restart(tmp_path, echo_backend):
    gateway = harness.Gateway(tmp_path / "gw", max_streams=1).start()
    agent = gateway.agent("lim", echo_backend.address)
    first = harness.connect(agent.port)
    first.sendall(b"x")
    assert first.recv(1) == b"x"
    with pytest.raises(OSError):  # over the limit of 1: reset at once (maybe while connecting)
        second = harness.connect(agent.port)
        second.sendall(b"y")
        assert second.recv(1) == b""
    text = gateway.config_path.read_text().replace("max_streams = 1", "max_streams = 4")
    text = text.replace("domain = example.test", "domain = other.test")
    gateway.config_path.write_text(text)
    gateway.proc.signal(signal.SIGHUP)
    gateway.proc.wait_for(r"reloaded ", 10)
    assert "domain changed" in gateway.proc.stderr() and "after a restart" in gateway.proc.stderr()
    third = harness.connect(agent.port)
    third.sendall(b"z")
    assert third.recv(1) == b"z"
    assert agent.stdout().count("tunnel up") == 1


@pytest.mark.timeout(30)
def test_sighup_with_a_broken_config_keeps_running(tmp_path, echo_backend):
    gateway = harness.Gateway(tmp_path / "gw").start()
    agent = gateway.agent("keep", echo_backend.address)
    with open(gateway.config_path, "a") as config:
        config.write("no_such_key = 1\n")
    gateway.proc.signal(signal.SIGHUP)
    gateway.proc.wait_for(r"reload refused, keeping the running config: .*server.conf:\d+", 10)
    client = harness.connect(agent.port)
    client.sendall(b"ok")
    assert client.recv(2) == b"ok"
