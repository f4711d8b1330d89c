"""Shared fixtures: every process a test starts is killed by PID when the test ends."""

import pytest

from tests import harness


@pytest.fixture(autouse=True)
def _reap_processes():
    start = len(harness.Proc.registry)
    yield
    for proc in harness.Proc.registry[start:]:
        proc.close()
    del harness.Proc.registry[start:]


@pytest.fixture
def gateway(tmp_path):
    """A started diglett server with test timers, in its own folder."""
    return harness.Gateway(tmp_path / "gw").start()


@pytest.fixture
def echo_backend():
    backend = harness.Backend(harness.echo)
    yield backend
    backend.close()
