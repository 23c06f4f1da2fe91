"""Expiry sweeps on PostgreSQL in one transaction a batch (pick locked, delete, tombstone, commit): what the
row locks decide against holds, retention changes, other sweepers, failing stores and crashes; purges stay
two-phase."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from config.errors import Gone
from tests.factories import (database_time, end_leases, expiring_in, register_aged, rows_by_id, seed_items, states,
                             wait_past, wait_until_blocked_by)
from worker.db import Database
from worker.models import AuditEvent, MediaItem
from worker.store import DeleteResult
from worker.store.fs import FilesystemStore
from worker.sweep import Sweeper

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database", ["postgresql"], indirect=True)]


class GatedStore(FilesystemStore):
    """The real store, whose deletes wait at a gate: the test acts while a batch holds its row locks. Every
    key it is asked to delete is counted, and `seen` records the committed state of each item's row (read on
    another connection) as the store is asked."""

    def __init__(self, root, observer: Database | None = None):
        super().__init__(root, delete_threads=2)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.gate.set()
        self.observer = observer
        self.asked: Counter[str] = Counter()
        self.seen: dict[str, str] = {}
        self.lock = threading.Lock()

    def delete_many(self, keys):
        with self.lock:
            self.asked.update(keys)
        if self.observer is not None:
            with self.observer.transaction() as session:
                self.seen.update(session.execute(select(MediaItem.storage_key, MediaItem.state)
                                                 .where(MediaItem.storage_key.in_(keys))).all())
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().delete_many(keys)


class PidSweeper(Sweeper):
    """Remembers the PostgreSQL backend of its last batch's transaction (taken right after the pick)."""

    pid: int | None = None

    def _claimed(self, session, rows, token):
        self.pid = session.scalar(text("SELECT pg_backend_pid()"))
        return super()._claimed(session, rows, token)


def in_thread(function):
    """Run `function` on a thread; returns (thread, outcome) with outcome['value'] or outcome['error']."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.fixture
def observer(database):
    """Another connection pool on the catalog, to read what is committed while a batch holds its locks."""
    other = Database(database.url)
    yield other
    other.dispose()


def gated_sweep(database, media_root, observer, *, batch_size=100, limit=None):
    """A sweep (one transaction a batch) of up to `limit` items running on a thread, stopped at its first store
    call with its rows locked. Returns (sweeper, store, thread, outcome)."""
    store = GatedStore(media_root, observer=observer)
    store.gate.clear()
    sweeper = PidSweeper(database, store, claim_lease=timedelta(minutes=5), batch_size=batch_size)
    assert sweeper.one_transaction, "PostgreSQL sweeps should run one transaction a batch"
    thread, outcome = in_thread(lambda: sweeper.sweep(limit=limit))
    assert store.entered.wait(30), "the sweep never reached the store"
    return sweeper, store, thread, outcome


def test_an_expiry_sweep_writes_nothing_before_its_blobs_are_gone_and_each_row_once(observer, catalog, database, media_root):
    """While the store deletes, every row of the batch is still `active` in the committed catalog (and answers
    404: it expired); after the commit each is a tombstone whose row was written once (one row version since
    the pick: its xmin is the sweep's transaction)."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 20)
    sweeper, store, thread, outcome = gated_sweep(database, media_root, observer)
    assert set(states(catalog, ids).values()) == {"active"}
    with pytest.raises(Gone):
        catalog.lookup(ids[0])
    store.gate.set()
    thread.join(30)
    assert outcome["value"].deleted == 20
    assert set(store.seen.values()) == {"active"}
    with database.transaction() as session:
        versions = set(session.scalars(text("SELECT xmin::text FROM media_items WHERE id = ANY(:ids)"), {"ids": ids}))
        audit = session.scalar(select(func.sum(AuditEvent.details["count"].as_integer())).where(AuditEvent.action == "deleted"))
    assert len(versions) == 1, "the rows were written by more than one transaction"
    assert audit == 20
    assert not any(store.iter_keys())


def test_a_hold_committed_while_the_batchs_blobs_are_deleted_waits_and_finds_the_item_deleted(observer, catalog, database, media_root):
    """A hold of an item whose blob the batch is deleting waits for the batch's row lock, then finds a tombstone
    and is refused (Gone): the hold never reports an item held whose blob is gone. A hold of an item outside
    the batch (not expired) goes through at once, and its blob stays."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 5)
    [fresh] = seed_items(catalog.db, media_root, "acme", 1, prefix="fresh", expired=False)
    sweeper, store, thread, outcome = gated_sweep(database, media_root, observer)
    catalog.set_hold(held=True, reason="case 9", ids=[fresh], actor="counsel")
    holding, held = in_thread(lambda: catalog.set_hold(held=True, reason="case 9", ids=[ids[2]], actor="counsel"))
    wait_until_blocked_by(database, sweeper.pid)
    store.gate.set()
    thread.join(30)
    holding.join(30)
    assert isinstance(held.get("error"), Gone), held
    assert outcome["value"].deleted == 5
    rows = rows_by_id(catalog, [ids[2], fresh])
    assert (rows[ids[2]].state, rows[ids[2]].held_at) == ("deleted", None)
    assert rows[ids[2]].deleted_at >= rows[ids[2]].claimed_at >= rows[ids[2]].expires_at
    assert rows[fresh].state == "active" and rows[fresh].held_at is not None
    assert catalog.store.exists(rows[fresh].storage_key)


def test_an_org_hold_placed_before_the_expiry_keeps_those_items_and_one_placed_after_keeps_none(catalog, database,
                                                                                                    media_root, tmp_path):
    """An org hold placed before ten items expired makes them unclaimable past their expiry: the sweep locks none of
    them and asks the store for no key of theirs. The twenty that had expired before the hold are gone by their
    expiry (expired is final): the hold does not cover them and the sweep deletes them."""
    catalog.set_org("acme", "30d")
    gone = seed_items(catalog.db, media_root, "acme", 20)
    kept = [expiring_in(catalog, "acme", 3, uploads=tmp_path) for _ in range(10)]
    catalog.set_hold(held=True, reason="case 10", org="acme", actor="counsel")
    wait_past(catalog, *kept)
    store = GatedStore(media_root)
    counts = Sweeper(database, store, claim_lease=timedelta(minutes=5), batch_size=10).sweep()
    assert (counts.claimed, counts.deleted, counts.held_skipped) == (20, 20, 10)
    assert not set(store.asked) & {item.key for item in kept}
    assert set(states(catalog, gone).values()) == {"deleted"}
    assert set(states(catalog, [item.id for item in kept]).values()) == {"active"}


def test_an_org_hold_placed_while_a_batch_deletes_neither_waits_for_it_nor_covers_an_expired_item(observer, catalog,
                                                                                                   database, media_root):
    """An org hold placed while a batch holds its rows' locks (its blobs being deleted) does not wait for them: every
    expired item is gone by its expiry and stays unheld (expired is final), the org's live items are held. The
    batch commits its deletions, the next sweep takes the other expired items, and no live item's blob is asked for."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 30)
    live = seed_items(catalog.db, media_root, "acme", 5, prefix="live", expired=False)
    sweeper, store, thread, outcome = gated_sweep(database, media_root, observer, batch_size=10, limit=10)
    holding, held = in_thread(lambda: catalog.set_hold(held=True, reason="case 11", org="acme", actor="counsel"))
    holding.join(10)
    assert not holding.is_alive(), "the org hold waited for a batch of expired items"
    assert "error" not in held, held
    rows = rows_by_id(catalog, ids + live)
    assert {media_id for media_id, row in rows.items() if row.org_held} == set(live)
    store.gate.set()
    thread.join(30)
    assert "error" not in outcome and outcome["value"].deleted == 10, outcome
    assert Sweeper(database, store, claim_lease=timedelta(minutes=5)).sweep().deleted == 20
    assert set(states(catalog, ids).values()) == {"deleted"} and set(states(catalog, live).values()) == {"active"}
    assert not set(store.asked) & {rows[media_id].storage_key for media_id in live}


def test_an_org_set_extending_retention_during_a_batch_reschedules_only_the_items_not_yet_expired(observer, catalog,
                                                                                                  database, media_root,
                                                                                                  tmp_path):
    """`org set --retention 30d` while a batch (of 3) deletes: it does not wait for the batch, reschedules none of the
    eight expired items (expired is final: the batch may have deleted their blobs already) and gives the three live
    ones the new expiry; the sweeps take all eight and leave the three with their blobs."""
    catalog.set_org("acme", "1d")
    expired = [register_aged(catalog, "acme", timedelta(days=2), uploads=tmp_path) for _ in range(8)]
    live = [register_aged(catalog, "acme", timedelta(hours=12), uploads=tmp_path) for _ in range(3)]
    sweeper, store, thread, outcome = gated_sweep(database, media_root, observer, batch_size=3, limit=3)
    setting, done = in_thread(lambda: catalog.set_org("acme", "30d"))
    setting.join(10)
    assert not setting.is_alive(), "the retention change waited for a batch of expired items"
    assert "error" not in done, done
    rows = rows_by_id(catalog, [item.id for item in expired + live])
    assert all(rows[item.id].expires_at == item.expires_at for item in expired)
    assert all(rows[item.id].expires_at == item.created_at + timedelta(days=30) for item in live)
    store.gate.set()
    thread.join(30)
    assert "error" not in outcome and outcome["value"].deleted == 3, outcome
    assert Sweeper(database, catalog.store, claim_lease=timedelta(minutes=5)).sweep().deleted == 5
    after = states(catalog, [item.id for item in expired + live])
    assert Counter(after.values()) == {"deleted": 8, "active": 3}
    assert all(catalog.store.exists(item.key) for item in live)


def test_two_one_transaction_sweepers_ask_the_store_for_each_key_once(catalog, database, media_root):
    """Two sweepers, each with several batches in flight, over 2,000 expired items: each key is asked for once,
    every item ends deleted exactly once (the audit trail and the counts agree), unexpired ones untouched."""
    catalog.set_org("acme", "30d")
    expired = seed_items(catalog.db, media_root, "acme", 2000, prefix="old")
    fresh = seed_items(catalog.db, media_root, "acme", 100, prefix="new", expired=False)
    store = GatedStore(media_root)
    results = {}

    def run(name):
        db = Database(database.url)
        try:
            results[name] = Sweeper(db, store, claim_lease=timedelta(minutes=5), batch_size=50).sweep()
        finally:
            db.dispose()

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results["a"].deleted + results["b"].deleted == 2000
    assert max(store.asked.values()) == 1 and len(store.asked) == 2000
    with database.transaction() as session:
        audit = session.scalar(select(func.sum(AuditEvent.details["count"].as_integer())).where(AuditEvent.action == "deleted"))
    assert audit == 2000
    assert set(states(catalog, expired).values()) == {"deleted"}
    assert set(states(catalog, fresh).values()) == {"active"}


class FailingStore(FilesystemStore):
    """Fails every delete of the chosen keys."""

    def __init__(self, root, bad):
        super().__init__(root, delete_threads=2)
        self.bad, self.asked = set(bad), Counter()

    def delete_many(self, keys):
        self.asked.update(keys)
        good = [key for key in keys if key not in self.bad]
        done = dict(zip(good, super().delete_many(good), strict=True))
        return [done.get(key) or DeleteResult(key, ok=False, error="EIO: injected") for key in keys]


def test_a_failed_delete_becomes_a_claim_with_backoff_and_is_not_retried_in_a_tight_loop(catalog, database, media_root):
    """The failed item is written `deleting` (404, surfaced) with its error, one attempt, its reason and a lease
    the backoff ahead; the sweep does not pick it again within the run nor the next run; once the backoff ran
    out a sweep retries it and counts another attempt."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 10)
    bad, other = (rows_by_id(catalog, [m])[m].storage_key for m in (ids[4], ids[5]))
    store = FailingStore(media_root, [bad, other])  # two failures in one batch: one statement for both
    sweeper = Sweeper(database, store, claim_lease=timedelta(minutes=5), batch_size=3)
    first = sweeper.sweep()
    assert (first.deleted, first.failed) == (8, 2)
    now = database_time(database)
    row = rows_by_id(catalog, [ids[4]])[ids[4]]
    assert (row.state, row.attempts, row.last_error, row.deletion_reason) == ("deleting", 1, "EIO: injected", "ttl")
    assert row.claim_token and row.claimed_at >= row.expires_at
    assert timedelta(seconds=25) < row.lease_until - now <= timedelta(seconds=30)
    assert sweeper.sweep().claimed == 0
    assert store.asked[bad] == 1
    end_leases(database)
    second = sweeper.sweep()
    assert (second.claimed, second.failed) == (2, 2)
    row = rows_by_id(catalog, [ids[4]])[ids[4]]
    assert row.attempts == 2 and row.lease_until - database_time(database) > timedelta(seconds=55)


class SlowStore(FilesystemStore):
    def delete_many(self, keys):
        time.sleep(0.3)
        return super().delete_many(keys)


def test_lateness_is_counted_from_expiry_to_when_the_blobs_were_gone_and_is_never_negative(catalog, database, media_root):
    """`deleted_at` is the wall clock after the store answered (not the transaction's start): at least the
    store's 0.3 s after `claimed_at`; lateness (deleted_at - expires_at) is positive and matches the counts."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 4)
    counts = Sweeper(database, SlowStore(media_root, delete_threads=1), claim_lease=timedelta(minutes=5)).sweep()
    rows = rows_by_id(catalog, ids).values()
    assert all(row.deleted_at - row.claimed_at >= timedelta(seconds=0.3) for row in rows)
    assert all(row.claimed_at >= row.expires_at for row in rows)
    late = [(row.deleted_at - row.expires_at).total_seconds() for row in rows]
    assert min(late) > 0 and counts.late_max_s == pytest.approx(max(late), abs=1e-3)


def test_a_purge_still_commits_its_claim_before_a_blob_goes(observer, catalog, database, media_root):
    """Purges delete media that has not expired: the store is asked only once the rows are `deleting` in the
    committed catalog (lookups already 404)."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 6, expired=False)
    store = GatedStore(media_root, observer=observer)
    sweeper = Sweeper(database, store, claim_lease=timedelta(minutes=5))
    counts = sweeper.purge_ids(ids[:3])
    assert counts.deleted == 3
    assert set(store.seen.values()) == {"deleting"} and len(store.seen) == 3
    org_counts = sweeper.purge_org("acme")
    assert org_counts.deleted == 3 and list(store.seen.values()).count("deleting") == 6


def test_a_purge_claim_whose_lease_ran_out_is_finished_by_a_sweep_and_its_late_finalize_counts_nothing(catalog, database,
                                                                                                       media_root):
    """A purge claimed items and stalled past its lease; a one-transaction sweep takes the stale claims over
    (reason `purge` kept, no lateness counted for it); the purge's own finalize, arriving late, changes and
    counts nothing: one tombstone, one audit count."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 3, expired=False)
    slow = Sweeper(database, catalog.store, claim_lease=timedelta(seconds=1), batch_size=10, one_transaction=False)
    claimed = slow.claim_ids(ids, "purge")
    assert len(claimed) == 3
    end_leases(database)
    swept = Sweeper(database, catalog.store, claim_lease=timedelta(minutes=5)).sweep()
    assert (swept.claimed, swept.deleted, swept.late_max_s) == (3, 3, None)
    late = slow.finalize_batch(claimed, [DeleteResult(item.storage_key, ok=True, missing=True) for item in claimed])
    assert (late.deleted, late.failed) == (0, 0)
    rows = rows_by_id(catalog, ids).values()
    assert {(row.state, row.deletion_reason) for row in rows} == {("deleted", "purge")}
    with database.transaction() as session:
        audit = session.scalar(select(func.sum(AuditEvent.details["count"].as_integer())).where(AuditEvent.action == "deleted"))
    assert audit == 3


_KILLED_IN_STORE = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import timedelta
    from worker.db import Database
    from worker.store.fs import FilesystemStore
    from worker.sweep import Sweeper

    class DiesAfterDeleting(FilesystemStore):
        def delete_many(self, keys):
            super().delete_many(keys)
            os.kill(os.getpid(), signal.SIGKILL)  # the blobs are gone, the transaction never commits

    db = Database(sys.argv[1])
    Sweeper(db, DiesAfterDeleting(sys.argv[2]), claim_lease=timedelta(hours=1), batch_size=1000).sweep()
    """
)


def test_a_sweep_killed_with_its_blobs_gone_before_its_commit_is_finished_at_once_by_the_next_sweep(catalog, database,
                                                                                                  media_root):
    """SIGKILL after the store deleted the batch, before the commit: the rows are still active and expired (404),
    nothing waits for a lease, and the next sweep tombstones them all (missing blobs count as deleted)."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 40)
    [fresh] = seed_items(catalog.db, media_root, "acme", 1, prefix="fresh", expired=False)
    crashed = subprocess.run([sys.executable, "-c", _KILLED_IN_STORE, database.url, str(media_root)], capture_output=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    assert set(states(catalog, ids).values()) == {"active"}
    assert {info.key for info in catalog.store.iter_keys()} == {rows_by_id(catalog, [fresh])[fresh].storage_key}
    with pytest.raises(Gone):
        catalog.lookup(ids[0])
    counts = Sweeper(database, catalog.store, claim_lease=timedelta(hours=1)).sweep()
    assert (counts.claimed, counts.deleted, counts.already_missing) == (40, 40, 40)
    assert set(states(catalog, ids).values()) == {"deleted"}
    assert states(catalog, [fresh]) == {fresh: "active"}


def test_the_pick_keeps_the_claim_conditions_for_the_row_recheck(catalog, database):
    """PostgreSQL re-checks a FOR UPDATE scan's conditions on a row's newest version when a committed change
    (a hold, a retention rewrite) got there first; it can only re-check the ones the plan keeps. The pick reads
    the claim's partial index and still filters on state, holds and expiry."""
    statement = catalog.sweeper._claims.expired_lock_statement
    with database.transaction() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(session.scalars(text(f"EXPLAIN {statement.element.text}"), {"limit": 10}))
    assert "ix_media_items_claimable_expiry" in plan, plan
    assert "held_at IS NULL" in plan and "NOT org_held" in plan and "'active'" in plan, plan
    assert "LockRows" in plan, plan


def test_a_hold_between_a_killed_batch_and_the_next_sweep_never_serves_an_item_without_its_blob(catalog, database, media_root):
    """A batch deleted its blobs and died before its commit: the rows are active and expired (404). A hold placed
    before the next sweep would make such an item live again with nothing behind it (served 200, never repaired:
    held items are not claimable). Expired is final: the hold is refused as gone, and the next sweep tombstones
    the item."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 5)
    crashed = subprocess.run([sys.executable, "-c", _KILLED_IN_STORE, database.url, str(media_root)], capture_output=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    rows = rows_by_id(catalog, ids)
    lost = [media_id for media_id in ids if not catalog.store.exists(rows[media_id].storage_key)]
    assert lost and all(rows[media_id].state == "active" for media_id in lost), "the kill left no blob gone under an active row"
    with pytest.raises(Gone):
        catalog.set_hold(held=True, reason="case 12", ids=[lost[0]], actor="counsel")
    catalog.set_hold(held=True, reason="case 12", org="acme", actor="counsel")
    catalog.set_org("acme", "90d")
    for media_id in ids:  # neither the org hold nor the longer retention brought one back
        with pytest.raises(Gone):
            catalog.lookup(media_id)
    assert catalog.sweeper.sweep().deleted == len(ids)
    assert all(row.state == "deleted" for row in rows_by_id(catalog, ids).values())
