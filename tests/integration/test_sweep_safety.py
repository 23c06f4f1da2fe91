"""Invariants under concurrency, crashes and failing deletes."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.factories import seed_items, states
from worker.db import Database
from worker.models import MediaItem
from worker.store import DeleteResult
from worker.store.fs import FilesystemStore
from worker.sweep import Sweeper


class RecordingStore(FilesystemStore):
    """The real filesystem store, remembering every key it was asked to delete."""

    def __init__(self, root, log, lock):
        super().__init__(root, delete_threads=4)
        self.log, self.lock = log, lock

    def delete_many(self, keys):
        with self.lock:
            self.log.extend(keys)
        return super().delete_many(keys)


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_two_sweepers_on_postgresql_split_thousands_of_items_without_overlap(database, media_root, catalog):
    """Two sweepers racing over 3,000 expired items delete each exactly once and never touch unexpired ones."""
    catalog.set_org("acme", "30d")
    expired = seed_items(catalog.db, media_root, "acme", 3000, prefix="old")
    fresh = seed_items(catalog.db, media_root, "acme", 300, prefix="new", expired=False)
    deleted_keys: list[str] = []
    lock = threading.Lock()
    results = {}

    def run(name):
        db = Database(database.url)
        store = RecordingStore(media_root, deleted_keys, lock)
        try:
            results[name] = Sweeper(db, store, claim_lease=timedelta(minutes=5), batch_size=100).sweep()
        finally:
            store.close()
            db.dispose()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results["a"].deleted + results["b"].deleted == 3000
    assert results["a"].deleted > 0 and results["b"].deleted > 0, "both sweepers should have won some batches"
    assert max(Counter(deleted_keys).values()) == 1, "a key was handed to the store twice"
    assert set(states(catalog, expired).values()) == {"deleted"}
    assert set(states(catalog, fresh).values()) == {"active"}
    assert all(catalog.store.exists(key) for key in (item_key(catalog, media_id) for media_id in fresh))


def item_key(catalog, media_id):
    with catalog.db.transaction() as session:
        return session.scalar(select(MediaItem.storage_key).where(MediaItem.id == media_id))


_KILLED_SWEEP = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import timedelta
    from worker.db import Database
    from worker.store.fs import FilesystemStore
    from worker.sweep import Sweeper

    class DiesBeforeFinalize(Sweeper):
        def finalize_batch(self, claimed, results):
            assert all(result.ok for result in results)
            os.kill(os.getpid(), signal.SIGKILL)  # the blobs are gone, the rows still say `deleting`

    db = Database(sys.argv[1])
    DiesBeforeFinalize(db, FilesystemStore(sys.argv[2]), claim_lease=timedelta(seconds=2), batch_size=1000,
                       one_transaction=False).sweep()
    """
)


def test_sweep_killed_between_delete_and_finalize_is_finished_by_a_later_sweep(catalog, database, media_root):
    """A two-phase sweep (SQLite's, and any path whose claim commits first) SIGKILLed after deleting blobs leaves
    `deleting` rows (lookups 404); after the lease the next sweep finalizes them: no blob left and no live ID
    pointing at a missing blob. (PostgreSQL's one-transaction kill: tests/integration/test_sweep_one_transaction.py.)"""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 40)
    crashed = subprocess.run([sys.executable, "-c", _KILLED_SWEEP, database.url, str(media_root)], capture_output=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    assert set(states(catalog, ids).values()) == {"deleting"}
    assert not any(catalog.store.iter_keys()), "the crashed sweep had already deleted every blob"
    from config.errors import Gone

    with pytest.raises(Gone):
        catalog.lookup(ids[0])
    patient = Sweeper(database, catalog.store, claim_lease=timedelta(seconds=2), batch_size=1000)
    assert patient.sweep().claimed == 0, "a live lease must not be taken over"
    time.sleep(2.2)
    counts = patient.sweep()
    assert (counts.claimed, counts.deleted, counts.already_missing) == (40, 40, 40)
    assert set(states(catalog, ids).values()) == {"deleted"}
    with database.transaction() as session:
        reasons = set(session.scalars(select(MediaItem.deletion_reason).where(MediaItem.id.in_(ids))))
    assert reasons == {"ttl"}


class FlakyStore(FilesystemStore):
    """Fails the first `failures` deletes of chosen keys, like a store having a bad minute."""

    def __init__(self, root, bad_keys, failures=1):
        super().__init__(root, delete_threads=2)
        self.remaining = dict.fromkeys(bad_keys, failures)

    def delete_many(self, keys):
        results = []
        for key in keys:
            if self.remaining.get(key, 0) > 0:
                self.remaining[key] -= 1
                results.append(DeleteResult(key, ok=False, error="EIO: injected"))
            else:
                results.extend(super().delete_many([key]))
        return results


def test_failed_deletes_are_retried_with_backoff_and_end_deleted(catalog, database, media_root, monkeypatch):
    """A failing delete keeps the item `deleting` with its error, is not retried before its backoff,
    and is deleted by the first sweep after it; the others are finalized once."""
    monkeypatch.setattr("worker.sweep.BACKOFF_BASE_SECONDS", 1)
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 10)
    bad = item_key(catalog, ids[3])
    sweeper = Sweeper(database, FlakyStore(media_root, [bad]), claim_lease=timedelta(minutes=5), batch_size=100)
    first = sweeper.sweep()
    assert (first.deleted, first.failed) == (9, 1)
    with database.transaction() as session:
        row = session.get(MediaItem, ids[3])
    assert (row.state, row.attempts, row.last_error) == ("deleting", 1, "EIO: injected")
    assert sweeper.sweep().claimed == 0, "retried before its backoff ran out"
    time.sleep(1.2)
    second = sweeper.sweep()
    assert (second.claimed, second.deleted) == (1, 1)
    assert states(catalog, [ids[3]]) == {ids[3]: "deleted"}
    assert not catalog.store.exists(bad)


def test_retry_backoff_doubles_and_is_capped_at_an_hour():
    """30 s, 60 s, 120 s ... never more than an hour."""
    from worker.sweep import backoff_seconds

    assert [backoff_seconds(n) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff_seconds(30) == 3600


def test_a_stale_claimer_cannot_finalize_rows_another_sweep_took_over(catalog, database, media_root):
    """Finalize only touches rows still under its own claim token."""
    catalog.set_org("acme", "30d")
    [media_id] = seed_items(catalog.db, media_root, "acme", 1)
    slow = Sweeper(database, catalog.store, claim_lease=timedelta(seconds=1), batch_size=10)
    [claimed] = slow.claim_expired(10)
    time.sleep(1.2)
    fast = Sweeper(database, catalog.store, claim_lease=timedelta(minutes=5), batch_size=10)
    [taken] = fast.claim_expired(10)
    assert taken.id == claimed.id and taken.token != claimed.token
    stale = slow.finalize_batch([claimed], [DeleteResult(claimed.storage_key, ok=False, error="late")])
    with database.transaction() as session:
        row = session.get(MediaItem, media_id)
    assert (row.attempts, row.last_error, row.claim_token) == (0, None, taken.token), stale


class SlowStore(FilesystemStore):
    """The real store, a little slow per batch, so sweeps and operator actions overlap."""

    def delete_many(self, keys):
        time.sleep(0.02)
        return super().delete_many(keys)


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_org_hold_and_retention_changes_race_sweepers_without_deadlock_or_late_deletes(database, media_root, catalog):
    """While two sweepers work through an org's expired backlog, another session rewrites its retention again and
    again and then holds the org: no statement deadlocks or fails; the hold covers none of the expired backlog
    (expired is final: gone by its expiry, its blobs maybe deleted already by a batch in flight), which the
    sweepers finish, and holds every live item of the org, none of which is claimed."""
    from sqlalchemy import func

    catalog.set_org("legal", "1d")
    ids = seed_items(catalog.db, media_root, "legal", 3000)
    live = seed_items(catalog.db, media_root, "legal", 200, prefix="live", expired=False)
    errors: list[BaseException] = []
    stop = threading.Event()

    def sweeper():
        db = Database(database.url)
        store = SlowStore(media_root, delete_threads=2)
        try:
            engine = Sweeper(db, store, claim_lease=timedelta(minutes=5), batch_size=50)
            while not stop.is_set() and engine.sweep().claimed:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            store.close()
            db.dispose()

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for retention in ["2d", "1d", "3d", "1d", "2d"]:
        catalog.set_org("legal", retention)  # every value keeps the 10-day-old items expired and the live ones live
    catalog.set_hold(held=True, reason="litigation", org="legal", actor="counsel")
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    catalog.sweeper.sweep()
    with database.transaction() as session:
        left = session.scalar(select(func.count()).where(MediaItem.id.in_(ids), MediaItem.state != "deleted"))
        kept = session.execute(select(MediaItem.state, MediaItem.org_held, MediaItem.claimed_at)
                               .where(MediaItem.id.in_(live))).all()
    assert left == 0, "the hold kept expired items it must not cover"
    assert len(kept) == len(live) and all(state == "active" and held and claimed is None for state, held, claimed in kept)
    assert catalog.sweeper.sweep().held_skipped == 0
