"""Real Celery fleets for tests and benchmarks: `celery worker` / `celery beat` processes started with
`-A tests.e2e.fleet_app`, on PostgreSQL and a Redis server of the test's own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from tests.conftest import free_port, service_unavailable
from worker.models import MediaItem, State

ROOT = Path(__file__).resolve().parents[1]



class RedisServer:
    """A private redis-server process that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path):
        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path)
    if not server.binary:
        service_unavailable("redis-server (binary, for a private Redis)", "PATH", FileNotFoundError("redis-server"))
    server.start()
    yield server
    server.stop()


class Fleet:
    """Starts and stops celery processes with the test's settings; reads their logs and journals."""

    def __init__(self, tmp_path: Path, env: dict):
        self.tmp_path = tmp_path
        self.env = env
        self.processes: dict[str, subprocess.Popen] = {}
        self.journal = Path(env["FLEET_TEST_JOURNAL"])

    def start(self, name: str, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "a")
        process = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.e2e.fleet_app", *args],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**self.env, **(extra_env or {})}, start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def worker(self, name: str, concurrency: int = 1, **kwargs) -> subprocess.Popen:
        return self.start(name, "worker", "--pool=prefork", f"--concurrency={concurrency}", f"--hostname={name}@%h",
                          "--without-gossip", "--without-mingle", "--loglevel=INFO", **kwargs)

    def beat(self, name: str) -> subprocess.Popen:
        return self.start(name, "beat", "--loglevel=INFO", f"--schedule={self.tmp_path / (name + '.schedule')}")

    def kill(self, name: str) -> None:
        """SIGKILL the whole process group: the main process and its pool children, no goodbyes."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log_events(self, name: str) -> list[dict]:
        events = []
        for line in (self.tmp_path / f"{name}.log").read_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def deleted_keys(self) -> Counter:
        counts: Counter = Counter()
        for journal in self.journal.glob("*.log"):
            counts.update(journal.read_text().split())
        return counts

    def journals_with_work(self) -> int:
        return sum(1 for journal in self.journal.glob("*.log") if journal.read_text().strip())


@pytest.fixture
def fleet(tmp_path, database, media_root, private_redis):
    journal = tmp_path / "journal"
    journal.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MEDIA_RETENTION_")}
    env.update(
        PYTHONPATH=str(ROOT),
        MEDIA_RETENTION_DATA_DIR=str(tmp_path / "data"),
        MEDIA_RETENTION_DATABASE_URL=database.url,
        MEDIA_RETENTION_BROKER_URL=private_redis.url,
        MEDIA_RETENTION_STORAGE_URL=media_root.as_uri(),
        MEDIA_RETENTION_SWEEP_INTERVAL="1s",
        MEDIA_RETENTION_SWEEP_BATCH_SIZE="100",
        # These fleets exercise beat's sweeps and their drains; the expiry watch would take the work first.
        # A test of the watch turns it on.
        MEDIA_RETENTION_WATCH_INTERVAL="off",
        MEDIA_RETENTION_LOG_FORMAT="json",
        FLEET_TEST_JOURNAL=str(journal),
    )
    fleet = Fleet(tmp_path, env)
    yield fleet
    fleet.stop_all()


def counts_by_state(database) -> dict[str, int]:
    with database.transaction() as session:
        return dict(session.execute(select(MediaItem.state, func.count()).group_by(MediaItem.state)).all())


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def all_swept(database, expected: int):
    return lambda: counts_by_state(database).get(State.DELETED.value, 0) == expected and not counts_by_state(database).get(State.DELETING.value)
