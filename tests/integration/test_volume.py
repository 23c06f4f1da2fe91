"""Volume alerts on PostgreSQL: workers racing as threads and as processes notify once per crossing."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable

import pytest
import structlog

from config.settings import load_settings
from tests.volume_support import (
    alert_row,
    events,
    fixed,
    race,
    real_ratio,
    thresholds_above,
    thresholds_below,
    volume_settings,
)
from worker.engine import build, volume_monitor
from worker.db import Database
from worker.store.fs import FilesystemStore
from worker.volume.monitor import VolumeMonitor

pytestmark = pytest.mark.postgres


def test_workers_racing_on_postgresql_notify_once_per_crossing(tmp_path, pg_database, receiver):
    """Eight threads with their own connections: first-ever state row, firing, escalation and recovery each notify once."""
    def monitor_at(ratio: float) -> Callable[[Database], VolumeMonitor]:
        return lambda db: volume_monitor(volume_settings(tmp_path, db, alert_webhook_url=receiver.url), db, fixed(ratio))

    with structlog.testing.capture_logs() as logs:
        rounds = [race(8, monitor_at(ratio), pg_database.url) for ratio in (0.85, 0.86, 0.95, 0.30)]
    assert [Counter(kinds) for kinds in rounds] == [
        {"firing": 1, None: 7}, {None: 8}, {"firing": 1, None: 7}, {"resolved": 1, None: 7}]
    assert events(logs) == ["volume.alert_firing", "volume.alert_firing", "volume.alert_resolved"]
    shapes = [[(a["status"], a["labels"]["severity"]) for a in p["alerts"]] for p in receiver.payloads()]
    assert shapes == [[("firing", "warning")], [("resolved", "warning"), ("firing", "critical")], [("resolved", "critical")]]
    row = alert_row(pg_database)
    assert (row.level, row.version, row.delivery_pending) == ("ok", 3, False)


def _check_in_a_process(database_url: str, data_dir: str, storage_url: str, webhook: str, start, results) -> None:
    """A separate worker process: its own interpreter, engine and connections."""
    db = Database(database_url)
    settings = load_settings(data_dir=data_dir, database_url=database_url, storage_url=storage_url,
                             alert_webhook_url=webhook)
    monitor = volume_monitor(settings, db, fixed(0.97))
    start.wait(timeout=30)
    results.put(monitor.check().notification)
    db.dispose()


@pytest.mark.slow
def test_worker_processes_racing_on_postgresql_notify_once(tmp_path, pg_database, receiver):
    """Four processes cross the critical threshold at the same instant: one notice, one webhook POST."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(4), context.Queue()
    processes = [
        context.Process(target=_check_in_a_process, args=(pg_database.url, str(tmp_path / "data"),
                                                          (tmp_path / "media").as_uri(), receiver.url, start, results))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    kinds = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    assert [process.exitcode for process in processes] == [0] * 4
    assert Counter(kinds) == {"firing": 1, None: 3}
    assert [p["status"] for p in receiver.payloads()] == ["firing"]


def test_real_filesystem_thresholds_raise_and_clear_the_alert_on_postgresql(tmp_path, pg_database, receiver):
    """statvfs of a real media root against thresholds below, then above, its usage: firing, then resolved."""
    (tmp_path / "media").mkdir()
    store = FilesystemStore(tmp_path / "media", delete_threads=1)
    ratio = real_ratio(store.root)
    for thresholds, expected in ((thresholds_below(ratio), ("critical", "firing")), (thresholds_above(ratio), ("ok", "resolved"))):
        settings = volume_settings(tmp_path, pg_database, alert_webhook_url=receiver.url, **thresholds)
        report = build(settings, database=pg_database, store=store).volume_monitor(enqueue_sweep=lambda: None).check()
        assert (report.evaluation.level.value, report.notification) == expected
    assert [p["status"] for p in receiver.payloads()] == ["firing", "resolved"]
    assert receiver.payloads()[0]["alerts"][0]["annotations"]["sweep"].startswith("an immediate sweep was enqueued")
