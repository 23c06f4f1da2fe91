"""The product as it is installed in the field.

A wheel is built from this tree and installed, without the test extras, into a fresh virtual
environment (once per run, shared by pytest-xdist's workers; pip's cache keeps it to about half a
minute). The dependencies come from the runtime lock and the wheel goes in with `--no-deps`, as the
Dockerfile installs them. Every process of these tests runs from that environment with its working
directory outside the repository and no PYTHONPATH, so nothing can import the source tree by accident.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock
from sqlalchemy import text

from tests.conftest import _schema_url
from tests.fleet import RedisServer
from tests.conftest import service_unavailable
from worker.db import Database

ROOT = Path(__file__).resolve().parents[2]
# What the wheel is built from: the package and its metadata, nothing of the tests.
SOURCES = ("pyproject.toml", "README.md", "config", "worker", "tasks")
# What production installs the dependencies from (`make lock` writes it).
RUNTIME_LOCK = ROOT / "requirements.lock"


@dataclass
class Installed:
    """A virtual environment holding the installed wheel and nothing else of ours."""

    venv: Path
    wheel: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self, **settings: str) -> dict[str, str]:
        """The environment a deployment gives a process: ours stripped (no MEDIA_RETENTION_*, no
        PYTHONPATH), the venv's bin first on PATH, plus `settings` as MEDIA_RETENTION_* variables."""
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("MEDIA_RETENTION_", "PROMETHEUS_MULTIPROC_DIR", "PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update({f"MEDIA_RETENTION_{name.upper()}": str(value) for name, value in settings.items()})
        return env


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    """Build the wheel from a copy of the sources and install it into a new venv, without test extras.

    Once per run: under pytest-xdist each worker process has a session of its own, so the build goes
    into the directory this run's workers share (the parent of a worker's base temp dir), under a file
    lock; the first worker to take it builds, the others wait and reuse what it built."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # .../pytest-N/popen-gwK -> .../pytest-N: this run's own, never another session's.
        shared = shared.parent
    root = shared / "field-install"
    with FileLock(str(shared / "field-install.lock")):
        if not (root / "installed").exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed build in another worker left
            _build(root)
            (root / "installed").touch()
    [wheel] = (root / "dist").glob("media_retention-*.whl")
    return Installed(venv=root / "venv", wheel=wheel)


def _build(root: Path) -> None:
    source = root / "source"
    source.mkdir(parents=True)
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    steps = [
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "dist"), str(source)],
        [sys.executable, "-m", "venv", str(root / "venv")],
    ]
    for step in steps:
        _run_or_fail(step)
    [wheel] = (root / "dist").glob("media_retention-*.whl")
    # As the Dockerfile and the README's production install do it: the runtime lock, hashes checked, then the
    # wheel without resolving anything more.
    pip = [str(root / "venv" / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    _run_or_fail([*pip, "--require-hashes", "-r", str(RUNTIME_LOCK)])
    _run_or_fail([*pip, "--no-deps", str(wheel)])


def _run_or_fail(argv: list[str]) -> None:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if completed.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}",
                    pytrace=False)


@pytest.fixture(scope="session")
def outside(tmp_path_factory) -> Path:
    """A working directory outside the repository."""
    directory = tmp_path_factory.mktemp("field-cwd")
    assert ROOT not in directory.resolve().parents
    return directory


# -- servers and processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_schema(pg_server_url: str) -> Iterator[str]:
    """The URL of an empty PostgreSQL schema (not migrated: the tests run `db upgrade` themselves)."""
    name = f"field_{secrets.token_hex(5)}"
    admin = Database(pg_server_url)
    with admin.engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield _schema_url(pg_server_url, name)
    finally:
        with admin.engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A private redis-server (its 16 databases let each deployed process have a broker of its own)."""
    server = RedisServer(tmp_path_factory.mktemp("field-redis"))
    if not server.binary:
        service_unavailable("redis-server (binary, for a private Redis)", "PATH", FileNotFoundError("redis-server"))
    server.start()
    yield server
    server.stop()



@dataclass
class Processes:
    """Long-running processes of a test (each in its own session, output to a log file), stopped at the end."""

    logs: Path
    running: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def assert_alive(self, name: str) -> None:
        process = self.running[name]
        assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}"

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command to completion (an operator's command, a health check)."""
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def memory_kib(pid: int) -> dict[str, int]:
    """Memory of a process and all its descendants, in KiB: `rss` (resident, shared pages counted in
    each process) and `pss` (shared pages divided among their sharers; what a cgroup is charged, about)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    totals, pending = {"rss": 0, "pss": 0, "processes": 0}, [pid]
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, []))
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.endswith("kB")}
        totals["rss"] += fields.get("Rss", 0)
        totals["pss"] += fields.get("Pss", 0)
        totals["processes"] += 1
    return totals
