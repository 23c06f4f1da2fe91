"""The ecosystem's own tools (promtool, Alertmanager, systemd-analyze, docker-compose) as the tests use them.

`.ci/run` installs them from Debian packages. A tool missing on a laptop skips its tests with a loud
reason; under CI=true a missing tool fails them, like a missing server.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import ON_CI

# Which Debian package brings each tool (what `.ci/run` installs).
PACKAGES = {
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
    "systemd-analyze": "systemd",
    "docker-compose": "docker-compose",
    "bash": "bash",
    "strace": "strace",
    "socat": "socat",
}


def unavailable(message: str) -> None:
    """Skip the test loudly; under CI=true, fail it: CI must never pass by skipping."""
    if ON_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {message}")


def require_tool(name: str) -> str:
    """The path of `name` on PATH; skips loudly when it is missing, fails under CI=true."""
    path = shutil.which(name)
    if not path:
        unavailable(f"{name} is not installed (Debian package {PACKAGES[name]}: "
                    f"apt-get install --no-install-recommends {PACKAGES[name]}, as .ci/run does)")
    return path
