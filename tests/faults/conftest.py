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
from pathlib import Path

import pytest
from sqlalchemy import select

from tests import conftest
from tests.conftest import ON_CI
from tests.factories import Blobs, end_leases, plant_blob, seed_items, seed_org, seed_variants
from config.errors import RetentionError
from config.settings import load_settings
from worker.db import Database
from worker.engine import build
from worker.models import MediaItem, State
from worker.store.keys import key_for_id

ROOT = Path(__file__).resolve().parents[2]
# How many SIGKILLs each killed command takes: 12 in the default suite (the three killed commands were a
# quarter of its machine time at 20), 100 in `make faults`.
KILLS = int(os.environ.get("MEDIA_RETENTION_TEST_KILLS", "12"))


def seed() -> int:
    """This run's seed (MEDIA_RETENTION_TEST_FAULT_SEED, or drawn at random), printed with every failure so
    the same kill times can be replayed. tests/conftest.py chooses it when pytest configures and hands it
    to pytest-xdist's workers: read it when a test runs, never when a module is imported (this conftest
    can be imported before pytest is configured)."""
    return conftest.FAULT_SEED


# Figures for the summary printed at the end of the session (docs/safety.md's fault table): each test's rows go
# onto its report (see `_summary_rows`), and tests/conftest.py prints them, in one process or from xdist's.
SUMMARY: list[dict] = []


def record(fault: str, how: str, times: int, lost: int, early: int, result: str, **extra) -> None:
    SUMMARY.append(dict(fault=fault, how=how, times=times, lost=lost, early=early, result=result, **extra))


@pytest.fixture(autouse=True)
def _summary_rows(request):
    """What this test recorded, put on its report for the session's summary."""
    before = len(SUMMARY)
    yield
    request.node.user_properties.extend((conftest.FAULT_SUMMARY_PROPERTY, row) for row in SUMMARY[before:])


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None and item.path.parent == Path(__file__).parent:
        item.add_report_section("call", "replay", f"replay with MEDIA_RETENTION_TEST_FAULT_SEED={seed()}")


def skip_or_fail(reason: str) -> None:
    """Skip loudly on a laptop; under CI=true a missing capability is a failure, never a skip."""
    if ON_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


@pytest.fixture
def rng(request) -> random.Random:
    # Each test gets its own stream from the session seed, so one test replays alone.
    return random.Random(f"{seed()}:{request.node.name}")


@dataclass
class Recorded:
    """What the test registered: media id -> storage key, and which ones the sweep may take."""

    keys: dict[str, str] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    variants: dict[str, list[str]] = field(default_factory=dict)  # media id -> its variants' keys

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
        self.bound = False

    # -- processes -------------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "from worker.cli import entry_point; entry_point()", *args]

    def bind(self) -> None:
        """Bind the world's store to its catalog, as `db upgrade` does for a deployment (a new one's store, or
        one whose live items' blobs the store holds); once, before its first command."""
        if self.bound:
            return
        self.bound = True
        values = {name.removeprefix("MEDIA_RETENTION_").lower(): value for name, value in self.env.items()
                  if name.startswith("MEDIA_RETENTION_")}
        engine = build(load_settings(**values), database=self.db)
        try:
            engine.binding.ensure()
        except (RetentionError, OSError):
            pass  # a full or missing volume: the commands the test runs bind it, or refuse in one sentence
        finally:
            engine.store.close()

    def start(self, *args: str, env: dict | None = None, user: str | None = None) -> subprocess.Popen:
        self.bind()
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

    def seed(self, prefix: str, *, expired: int = 0, unexpired: int = 0, held: int = 0, size: int = 64,
             blobs: Blobs | None = None, variants: int = 0) -> None:
        """Blobs (in the media root unless told) and active rows of org acme, recorded; `held` items are
        expired too, and held. With `variants`, each item also owns that many variants (`variants/<id>/<n>`)."""
        seed_org(self.db, "acme")
        blobs = self.media if blobs is None else blobs
        plan = (("x", expired, True, False), ("u", unexpired, False, False), ("h", held, True, True))
        for kind, count, is_expired, is_held in plan:
            ids = seed_items(self.db, blobs, "acme", count, prefix=f"{prefix}-{kind}", expired=is_expired, held=is_held,
                             size=size)
            self.record.keys.update((media_id, key_for_id(media_id)) for media_id in ids)
            if is_expired:
                self.record.expired.update(ids)
            if is_held:
                self.record.held.update(ids)
            if variants:
                owned = {media_id: [f"variants/{media_id}/{n}" for n in range(variants)] for media_id in ids}
                seed_variants(self.db, blobs, owned, size=size // 2)
                self.record.variants.update(owned)

    def orphans(self, prefix: str, count: int) -> list[Path]:
        """Blobs in the media root that no row names."""
        return [plant_blob(self.media, key_for_id(f"{prefix}-orphan-{n:04d}"), b"o" * 32) for n in range(count)]

    def end_leases(self) -> None:
        """Let time pass for claims a killed process left behind (their lease ends now, as it would later)."""
        end_leases(self.db)

    def states(self) -> dict[str, str]:
        with self.db.transaction() as session:
            return dict(session.execute(select(MediaItem.id, MediaItem.state)).all())

    # -- the independent check -------------------------------------------------------------------

    def check_record(self) -> tuple[int, int]:
        """Nothing kept was deleted, every doomed item is a tombstone with its blob gone.
        Returns (items lost, items deleted early) for the summary; asserts both are zero."""
        states = self.states()
        early = sorted(m for m in self.record.kept if states.get(m) != State.ACTIVE.value or not self.exists(self.record.keys[m])
                       or not all(self.exists(key) for key in self.record.variants.get(m, ())))
        lost = sorted(m for m in self.record.doomed if states.get(m) != State.DELETED.value or self.exists(self.record.keys[m])
                      or any(self.exists(key) for key in self.record.variants.get(m, ())))
        assert not early, f"kept items deleted or changed: {early[:10]} (seed {seed()})"
        assert not lost, f"expired items not cleanly deleted: {lost[:10]} (seed {seed()})"
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
