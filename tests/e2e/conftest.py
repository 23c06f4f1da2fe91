"""Drive the command line as a user does: as a real subprocess (the installed `media-retention`
script) for the walk-through and `run`; the in-process `cli` fixture lives in tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Result

SCRIPT = Path(sys.executable).with_name("media-retention")


@pytest.fixture
def shell(data_dir):
    """Run the installed `media-retention` script in a subprocess with this test's data dir."""

    def run(*args: str, env: dict | None = None, timeout: float = 60) -> Result:
        completed = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                                   env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        return Result(completed.returncode, completed.stdout, completed.stderr)

    return run
