"""Deletions per second of a real fleet with one and with two worker processes, same backlog, one run.

Run with `make bench` (or `pytest tests/bench/bench_fleet.py -s -o addopts= -o python_files='bench_*.py'`).
Timed by the database clock: from the first sweep's start to the last item's `deleted_at`.
"""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import func, select

from tests.factories import seed_items
from tests.fleet import wait_until
from worker.models import MediaItem, State, SweepRun

BACKLOG = int(os.environ.get("BENCH_FLEET_ITEMS", "50000"))

pytestmark = pytest.mark.parametrize("database", ["postgresql"], indirect=True)


def phase_rate(fleet, catalog, database, media_root, prefix: str, processes: int) -> tuple[float, float]:
    seed_items(catalog.db, media_root, "acme", BACKLOG, prefix=prefix)
    with database.transaction() as session:
        runs_before = session.scalar(select(func.coalesce(func.max(SweepRun.id), 0)))
    for number in range(processes):
        fleet.worker(f"{prefix}-w{number}")
    time.sleep(4)  # let the workers finish starting before beat sends the first sweep
    fleet.beat(f"{prefix}-beat")

    def done():
        with database.transaction() as session:
            return session.scalar(select(func.count()).where(MediaItem.id.like(f"{prefix}-%"), MediaItem.state != State.DELETED.value)) == 0

    wait_until(done, 600, f"{BACKLOG} deletions with {processes} process(es)", interval=0.5)
    with database.transaction() as session:
        started = session.scalar(select(func.min(SweepRun.started_at)).where(SweepRun.id > runs_before))
        finished = session.scalar(select(func.max(MediaItem.deleted_at)).where(MediaItem.id.like(f"{prefix}-%")))
    fleet.stop_all()
    fleet.processes.clear()
    seconds = (finished - started).total_seconds()
    return BACKLOG / seconds, seconds


def test_two_worker_processes_delete_faster_than_one(fleet, catalog, database, media_root):
    """Figures for docs/performance.md: items/s with 1 and 2 worker processes and their ratio."""
    catalog.set_org("acme", "30d")
    fleet.env["MEDIA_RETENTION_SWEEP_BATCH_SIZE"] = "500"
    fleet.env["MEDIA_RETENTION_SWEEP_INTERVAL"] = "2s"
    one, one_s = phase_rate(fleet, catalog, database, media_root, "one", 1)
    two, two_s = phase_rate(fleet, catalog, database, media_root, "two", 2)
    print(f"\nfleet sweep, {BACKLOG} expired items, filesystem store, PostgreSQL + Redis, {os.cpu_count()} cores")
    print(f"  1 worker process : {one:8.0f} items/s ({one_s:.1f} s)")
    print(f"  2 worker processes: {two:8.0f} items/s ({two_s:.1f} s)")
    print(f"  ratio 2/1        : {two / one:8.2f}")
    assert two > 0 and one > 0
