"""Drive the command line as a user does: in-process for the many input checks, as a real
subprocess (the installed `media-retention` script) for the walk-through and `run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from config.settings import get_settings
from worker.cli import main

SCRIPT = Path(sys.executable).with_name("media-retention")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty data dir holding every embedded default (SQLite catalog, media, broker)."""
    directory = tmp_path / "data"
    for name in list(os.environ):
        if name.startswith("MEDIA_RETENTION_") and not name.startswith("MEDIA_RETENTION_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDIA_RETENTION_DATA_DIR", str(directory))
    get_settings.cache_clear()
    yield directory
    get_settings.cache_clear()


@pytest.fixture
def cli(data_dir, capsys):
    """Run `media-retention ARGS` in this process; returns exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def shell(data_dir):
    """Run the installed `media-retention` script in a subprocess with this test's data dir."""

    def run(*args: str, env: dict | None = None, timeout: float = 60) -> Result:
        completed = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                                   env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        return Result(completed.returncode, completed.stdout, completed.stderr)

    return run
