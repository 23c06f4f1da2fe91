"""The expiry watch: items go within about a second of their expiry, never before it, never while held."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from tests.factories import db_time, make_file
from tests.fleet import wait_until
from worker.models import MediaItem, State
from worker.store.memory import MemoryStore
from worker.watch import JITTER_SHARE, ExpiryWatch, WatchThread


def expiring_in(catalog, uploads, seconds: float, *, media_id: str, held: bool = False):
    """Register an item with a one-hour TTL whose expiry lies `seconds` after the database's now."""
    created = db_time(catalog) - timedelta(hours=1) + timedelta(seconds=seconds)
    item = catalog.register(org="acme", file=make_file(uploads), media_id=media_id, ttl="1h", created_at=created)
    if held:
        catalog.set_hold(held=True, reason="legal", ids=[media_id], actor="test")
    return item


def rows(catalog, ids):
    with catalog.db.transaction() as session:
        return {row.id: row for row in session.execute(select(MediaItem).where(MediaItem.id.in_(ids))).scalars()}


def test_the_watch_deletes_items_within_a_second_of_expiry_and_none_before(catalog, tmp_path):
    """Items falling due a few seconds apart are each tombstoned after, and within ~1.5 s of, their expiry;
    an item due tomorrow and a held expired item stay."""
    catalog.set_org("acme", "30d")
    uploads = tmp_path / "uploads"
    due = [expiring_in(catalog, uploads, seconds, media_id=f"soon-{n}") for n, seconds in enumerate((1.5, 2.5, 3.5))]
    later = catalog.register(org="acme", file=make_file(uploads), media_id="tomorrow", ttl="1d")
    held = expiring_in(catalog, uploads, 1, media_id="held", held=True)  # held before it expires (expired is final)
    ids = [item.id for item in due]
    watch = WatchThread(ExpiryWatch(catalog.sweeper, interval_s=1.0)).start()
    try:
        wait_until(lambda: all(row.state == State.DELETED.value for row in rows(catalog, ids).values()), 20,
                   "the watch to delete three items as they fall due")
    finally:
        watch.stop()
    for row in rows(catalog, ids).values():
        lateness = (row.deleted_at - row.expires_at).total_seconds()
        assert 0 <= lateness <= 1.5, f"{row.id} went {lateness:.3f}s after its expiry"
        assert not (catalog.store.root / row.storage_key).exists()
    assert {row.id: row.state for row in rows(catalog, [later.id, held.id]).values()} == {
        "tomorrow": State.ACTIVE.value, "held": State.ACTIVE.value}


def test_status_reports_how_late_the_latest_deletions_by_expiry_went(catalog, cli_engine_status, tmp_path):
    """`status` gives p50, p99 and max of deleted_at - expires_at over the last window, from the tombstones."""
    catalog.set_org("acme", "30d")
    expiring_in(catalog, tmp_path / "uploads", -30, media_id="late-30s")
    expiring_in(catalog, tmp_path / "uploads", -10, media_id="late-10s")
    catalog.sweeper.sweep()
    late = cli_engine_status()["lateness"]
    assert late["items"] == 2
    assert 30 <= late["max_s"] < 40 and 10 <= late["p50_s"] < 20


@pytest.fixture
def cli_engine_status(engine):
    from worker import status

    return lambda: status.fleet_status(engine.db)


def test_a_failed_look_is_logged_and_retried_and_the_watch_goes_on(catalog, tmp_path, monkeypatch):
    """A look that fails (the database unreachable for a moment) is logged with its backoff; the watch keeps
    going and deletes what is due on a later look."""
    catalog.set_org("acme", "30d")
    expiring_in(catalog, tmp_path / "uploads", -1, media_id="due")
    probe = catalog.sweeper.seconds_until_due
    failures = iter([OperationalError("SELECT", {}, ConnectionRefusedError("database restarting"))])

    def flaky_probe():
        for failure in failures:
            raise failure
        return probe()

    monkeypatch.setattr(catalog.sweeper, "seconds_until_due", flaky_probe)
    stop = threading.Event()
    thread = threading.Thread(target=ExpiryWatch(catalog.sweeper, interval_s=1.0).run, args=(stop,))
    with capture_logs() as logs:
        thread.start()
        try:
            wait_until(lambda: rows(catalog, ["due"])["due"].state == State.DELETED.value, 15,
                       "the watch to delete the item after its first look failed")
        finally:
            stop.set()
            thread.join(10)
    [failed] = [event for event in logs if event["event"] == "watch.look_failed"]
    assert failed["failures"] == 1 and failed["retry_in_s"] == 2.0 and "database restarting" in failed["error"]


def test_a_store_that_fails_a_whole_batch_leaves_its_items_for_a_retry_with_backoff(sqlite_database, tmp_path):
    """A delete_many that raises instead of answering per key fails each of its items like a per-key error:
    kept `deleting` with the error and a backoff, the sweep goes on, and nothing is lost."""
    from config.settings import load_settings
    from worker.engine import build

    class BrokenStore(MemoryStore):
        def delete_many(self, keys):
            raise ConnectionError("store unreachable")

    settings = load_settings(data_dir=tmp_path / "data", database_url=sqlite_database.url, storage_url=(tmp_path / "m").as_uri())
    catalog = build(settings, database=sqlite_database, store=BrokenStore()).catalog
    catalog.set_org("acme", "30d")
    expiring_in(catalog, tmp_path / "uploads", -1, media_id="due")
    counts = catalog.sweeper.sweep()
    assert (counts.claimed, counts.deleted, counts.failed) == (1, 0, 1)
    row = rows(catalog, ["due"])["due"]
    assert (row.state, row.attempts, row.last_error) == (State.DELETING.value, 1, "ConnectionError: store unreachable")
    assert 25 <= (row.lease_until - db_time(catalog)).total_seconds() <= 30


def test_the_watch_sleeps_until_the_next_expiry_but_never_longer_than_its_interval():
    """Waits: the interval when nothing is pending or the next expiry is far; the time left when it is near,
    but at least a quarter interval, so a stream of expiries is taken in batches; plus at most 10 % jitter."""
    watch = ExpiryWatch(sweeper=None, interval_s=1.0)  # type: ignore[arg-type] - next_wait needs no sweeper
    jitter = 1.0 * JITTER_SHARE
    for due_in, low in ((None, 1.0), (3600.0, 1.0), (0.6, 0.6), (0.01, 0.25), (-5.0, 0.25)):
        for _ in range(20):
            assert low <= watch.next_wait(due_in) <= low + jitter, due_in
    with pytest.raises(ValueError):
        ExpiryWatch(sweeper=None, interval_s=0)  # type: ignore[arg-type]


def test_a_probe_says_when_the_next_item_falls_due_by_the_database_clock(catalog, tmp_path):
    """seconds_until_due: None on an empty catalog, the time left to the earliest claimable expiry, and
    0 or less once something is due; held media is not pending."""
    catalog.set_org("acme", "30d")
    assert catalog.sweeper.seconds_until_due() is None
    expiring_in(catalog, tmp_path / "uploads", 60, media_id="held", held=True)  # held before it expires
    assert catalog.sweeper.seconds_until_due() is None
    expiring_in(catalog, tmp_path / "uploads", 600, media_id="later")
    assert 590 < catalog.sweeper.seconds_until_due() <= 600
    expiring_in(catalog, tmp_path / "uploads", -2, media_id="due")
    assert catalog.sweeper.seconds_until_due() <= -2
    started = time.monotonic()
    catalog.sweeper.sweep()
    assert 500 < catalog.sweeper.seconds_until_due() <= 600 - (time.monotonic() - started)
