"""The README's first command: `diglett demo --once` serves a page through the tunnel."""

import subprocess

import pytest

from tests.support.harness import command


@pytest.mark.timeout(90)
def test_demo_fetches_the_public_url_through_the_tunnel():
    result = subprocess.run(command("diglett") + ["demo", "--once"], capture_output=True,
                            text=True, timeout=80)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "public URL: http://demo.localhost:" in result.stdout
    assert "HTTP 200" in result.stdout and "Hello through diglett" in result.stdout
