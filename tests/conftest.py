"""Shared fixtures: every process a test starts is killed by PID when the test ends."""

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.support import harness

# Hypothesis budgets of tests/unit/test_fuzz.py (docs/operations.md, "Fuzzing"). "fuzz-ci" is the
# default there: bounded and derandomized, so CI runs the same inputs every time. Long runs:
# HYPOTHESIS_PROFILE=fuzz (random, many examples, failures kept in .hypothesis/ for replay).
# Other test files keep their own settings unless HYPOTHESIS_PROFILE is set.
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile("fuzz-ci", max_examples=300, stateful_step_count=30, deadline=None,
                          derandomize=True, database=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
                          stateful_step_count=60, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


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


from tests.support.pgfixture import pg_url, postgres  # noqa: E402,F401  (shared PostgreSQL cluster)
