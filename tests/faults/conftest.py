"""Fault-injection harness: real `media-retention` processes on a catalog the test seeded and recorded.

Every test here keeps its own record of what it registered (which items expired, which are held) and
checks the outcome against that record, independently of `verify`, which it also runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from tests.conftest import ON_CI
from worker.db import Database, db_now
from worker.models import MediaItem, State
from worker.store.keys import key_for_id

ROOT = Path(__file__).resolve().parents[2]
# How many SIGKILLs each killed command takes; `make faults` raises it for soak runs.
KILLS = int(os.environ.get("MEDIA_RETENTION_TEST_KILLS", "20"))
# One seed per run, printed with every failure so the same kill times can be replayed.
SEED = int(os.environ.get("MEDIA_RETENTION_TEST_FAULT_SEED", str(random.SystemRandom().randrange(2**32))))

# Figures for the summary line printed at the end of the session (README's fault table).
SUMMARY: list[dict] = []


def record(fault: str, how: str, times: int, lost: int, early: int, result: str, **extra) -> None:
    SUMMARY.append(dict(fault=fault, how=how, times=times, lost=lost, early=early, result=result, **extra))


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    terminalreporter.section(f"fault injection (seed {SEED})")
    for row in SUMMARY:
        terminalreporter.write_line("faults: " + json.dumps(row, sort_keys=False))


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None and item.path.parent == Path(__file__).parent:
        item.add_report_section("call", "replay", f"replay with MEDIA_RETENTION_TEST_FAULT_SEED={SEED}")


def skip_or_fail(reason: str) -> None:
    """Skip loudly on a laptop; under CI=true a missing capability is a failure, never a skip."""
    if ON_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


@pytest.fixture
def rng(request) -> random.Random:
    # Each test gets its own stream from the session seed, so one test replays alone.
    return random.Random(f"{SEED}:{request.node.name}")


@dataclass
class Recorded:
    """What the test registered: media id -> storage key, and which ones the sweep may take."""

    keys: dict[str, str] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)

    @property
    def doomed(self) -> set[str]:
        return self.expired - self.held

    @property
    def kept(self) -> set[str]:
        return set(self.keys) - self.doomed


class World:
    """A PostgreSQL catalog (a schema of its own), a media root, and the CLI as a subprocess."""

    def __init__(self, tmp_path: Path, db: Database, **settings: str):
        self.tmp_path = tmp_path
        self.db = db
        self.media = tmp_path / "media"
        self.media.mkdir(exist_ok=True)
        self.record = Recorded()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIA_RETENTION_")}
        self.env.update(
            PYTHONPATH=str(ROOT),
            MEDIA_RETENTION_DATA_DIR=str(tmp_path / "data"),
            MEDIA_RETENTION_DATABASE_URL=db.url,
            MEDIA_RETENTION_STORAGE_URL=self.media.as_uri(),
            MEDIA_RETENTION_LOG_FORMAT="json",
            MEDIA_RETENTION_DEFAULT_RETENTION="30d",
        )
        self.env.update({f"MEDIA_RETENTION_{k.upper()}": v for k, v in settings.items()})
        # Whether a blob is in the store (replaced for an object store).
        self.exists = lambda key: (self.media / key).exists()

    # -- processes -------------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "from worker.cli import entry_point; entry_point()", *args]

    def start(self, *args: str, env: dict | None = None, user: str | None = None) -> subprocess.Popen:
        argv = self.command(*args)
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        return subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, *args: str, env: dict | None = None, user: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        process = self.start(*args, env=env, user=user)
        out, err = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, process.returncode, out, err)

    def ok(self, *args: str, **kwargs) -> dict:
        result = self.run(*args, "--json", **kwargs)
        assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr[-2000:]}"
        return json.loads(result.stdout)

    def verify_clean(self) -> dict:
        """`media-retention verify --json` finds nothing (blobs of killed registrations are young: notices)."""
        result = self.run("verify", "--json")
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["clean"], json.dumps(report, indent=1)[:4000]
        return report

    # -- seeding ---------------------------------------------------------------------------------

    def db_now(self):
        with self.db.transaction() as session:
            return session.scalar(select(db_now()))

    def seed(self, prefix: str, *, expired: int = 0, unexpired: int = 0, held: int = 0, body: bytes = b"m" * 64,
             write=None) -> None:
        """Write blobs and insert active rows; `held` items are expired too, and held."""
        now = self.db_now()
        with self.db.transaction() as session:
            from worker.models import Organization

            if session.get(Organization, "acme") is None:
                session.execute(insert(Organization).values(id="acme", retention_seconds=30 * 86400))
        rows = []
        plan = [("x", True, False)] * expired + [("u", False, False)] * unexpired + [("h", True, True)] * held
        for n, (kind, is_expired, is_held) in enumerate(plan):
            media_id = f"{prefix}-{kind}-{n:04d}"
            key = key_for_id(media_id)
            if write is not None:
                write(key, body)
            else:
                path = self.media / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
            # Far from the boundary on both sides: a kill must never be able to race the clock.
            expires = now - timedelta(hours=2) if is_expired else now + timedelta(days=5)
            rows.append({"id": media_id, "org_id": "acme", "storage_key": key, "size_bytes": len(body), "mime_type": "image/jpeg",
                         "created_at": expires - timedelta(days=1), "ttl_seconds": 86400, "expires_at": expires,
                         "state": State.ACTIVE.value, "held_at": now if is_held else None,
                         "hold_reason": "legal" if is_held else None})
            self.record.keys[media_id] = key
            if is_expired:
                self.record.expired.add(media_id)
            if is_held:
                self.record.held.add(media_id)
        with self.db.transaction() as session:
            for start in range(0, len(rows), 1000):
                session.execute(insert(MediaItem), rows[start:start + 1000])

    def orphans(self, prefix: str, count: int) -> list[Path]:
        paths = []
        for n in range(count):
            path = self.media / key_for_id(f"{prefix}-orphan-{n:04d}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"o" * 32)
            paths.append(path)
        return paths

    def end_leases(self) -> None:
        """Let time pass for claims a killed process left behind (their lease ends now, as it would later)."""
        table = MediaItem.__table__
        with self.db.transaction() as session:
            session.execute(update(table).where(table.c.state == State.DELETING.value).values(lease_until=db_now(-1)))

    def states(self) -> dict[str, str]:
        with self.db.transaction() as session:
            return dict(session.execute(select(MediaItem.id, MediaItem.state)).all())

    # -- the independent check -------------------------------------------------------------------

    def check_record(self) -> tuple[int, int]:
        """Nothing kept was deleted, every doomed item is a tombstone with its blob gone.
        Returns (items lost, items deleted early) for the summary; asserts both are zero."""
        states = self.states()
        early = sorted(m for m in self.record.kept if states.get(m) != State.ACTIVE.value or not self.exists(self.record.keys[m]))
        lost = sorted(m for m in self.record.doomed if states.get(m) != State.DELETED.value or self.exists(self.record.keys[m]))
        assert not early, f"kept items deleted or changed: {early[:10]} (seed {SEED})"
        assert not lost, f"expired items not cleanly deleted: {lost[:10]} (seed {SEED})"
        return len(lost), len(early)


@pytest.fixture
def world_factory(tmp_path, pg_database):
    def build(**settings: str) -> World:
        return World(tmp_path, pg_database, **settings)

    return build


def kill_at(process: subprocess.Popen, delay: float) -> bool:
    """SIGKILL the process group `delay` seconds after start; False when it had already exited."""
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        return True
    process.communicate()
    return False


def kill_after_work_starts(process: subprocess.Popen, started, delay: float) -> bool:
    """SIGKILL the process group `delay` seconds after `started()` first holds (its work began, as the
    database or the media root shows); False when the process exited first."""
    while not started():
        if process.poll() is not None:
            process.communicate()
            return False
        time.sleep(0.002)
    return kill_at(process, delay)


def measure_work(world: "World", started, *args: str) -> float:
    """Seconds from the moment `started()` holds to the command's exit, on an unkilled run."""
    process = world.start(*args)
    while not started() and process.poll() is None:
        time.sleep(0.002)
    began = time.monotonic()
    out, err = process.communicate()
    assert process.returncode == 0, err[-2000:]
    return max(time.monotonic() - began, 0.05)


def timed(world: World, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = world.run(*args)
    return time.monotonic() - started, result
