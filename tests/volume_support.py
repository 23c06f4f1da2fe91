"""Helpers of the volume-check tests (tests/unit/test_volume_alerts.py on SQLite, tests/integration/test_volume.py
on PostgreSQL): settings around a real filesystem, thresholds either side of its real usage, scripted measures,
the alert row, and workers racing to check at the same instant."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from config.settings import Settings, load_settings
from worker.db import Database, db_now
from worker.models import VolumeAlert
from worker.volume import Usage, filesystem_usage
from worker.volume.monitor import VolumeMonitor


def volume_settings(tmp_path: Path, db: Database, **overrides) -> Settings:
    values = dict(data_dir=tmp_path / "data", database_url=db.url, storage_url=(tmp_path / "media").as_uri())
    values.update(overrides)
    return load_settings(**values)


def real_ratio(path: Path) -> float:
    """The fullest resource of the filesystem holding `path`, as the monitor will see it."""
    return max(filesystem_usage(path).ratios().values())


def thresholds_below(ratio: float) -> dict:
    """Warn and critical both below the real usage: the volume is critical."""
    return {"volume_warn": ratio * 0.5, "volume_critical": ratio * 0.75, "volume_hysteresis": min(0.01, ratio * 0.25)}


def thresholds_above(ratio: float) -> dict:
    """Warn and critical both well above the real usage (beyond the hysteresis): the volume is fine."""
    if ratio > 0.95:
        pytest.skip(f"the test filesystem is {ratio:.0%} full; no room for thresholds above it")
    return {"volume_warn": ratio + (1 - ratio) * 0.5, "volume_critical": ratio + (1 - ratio) * 0.75,
            "volume_hysteresis": 0.01}


def fixed(*ratios: float) -> Callable[[], Usage]:
    """A measure returning these byte ratios in turn (of a 1,000,000-byte volume), then the last for ever."""
    values = list(ratios)

    def measure() -> Usage:
        ratio = values.pop(0) if len(values) > 1 else values[0]
        return Usage(used_bytes=round(ratio * 1_000_000), total_bytes=1_000_000)

    return measure


def alert_row(db: Database) -> VolumeAlert:
    with db.transaction() as session:
        row = session.get(VolumeAlert, "media")
        session.expunge_all()
    return row


def db_time(db: Database, seconds_ago: int = 0) -> datetime:
    with db.transaction() as session:
        return session.scalar(select(db_now())) - timedelta(seconds=seconds_ago)


def age_notification(db: Database, seconds: int) -> None:
    """Let time pass for the alert: its last notice was `seconds` ago, by the database clock."""
    with db.transaction() as session:
        session.execute(update(VolumeAlert.__table__).values(notified_at=db_time(db, seconds)))


def events(logs: list[dict], prefix: str = "volume.alert_") -> list[str]:
    return [entry["event"] for entry in logs if entry["event"].startswith(prefix)]


def race(count: int, make_monitor: Callable[[Database], VolumeMonitor], url: str) -> list[str | None]:
    """`count` workers, each with its own engine, check at the same instant; returns what each announced."""
    barrier, results, errors = threading.Barrier(count), [None] * count, []
    databases = [Database(url) for _ in range(count)]

    def worker(number: int) -> None:
        try:
            monitor = make_monitor(databases[number])
            barrier.wait(timeout=10)
            results[number] = monitor.check().notification
        except Exception as exc:  # noqa: BLE001 - reported below with the worker's number
            errors.append((number, exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for db in databases:
        db.dispose()
    assert not errors, errors
    return results
