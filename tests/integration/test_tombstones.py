"""Tombstone compaction: old tombstones go, a batch at a time; nothing live, claimed or recent is touched."""

from __future__ import annotations

import functools
import shutil
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from config.errors import Gone, NotFound
from tests.factories import register_aged, seed_items, states, wait_until_older
from worker.db import db_now
from worker.models import MediaItem, State
from worker.reconcile import Reconciler
from worker.tombstones import Tombstones


def age_tombstones(db, ids, days: int) -> None:
    """Let `days` pass for these tombstones: deleted that long ago."""
    table = MediaItem.__table__
    with db.transaction() as session:
        rows = session.execute(select(table.c.id, table.c.deleted_at).where(table.c.id.in_(ids))).all()
        for media_id, deleted_at in rows:
            session.execute(update(table).where(table.c.id == media_id).values(deleted_at=deleted_at - timedelta(days=days)))


def counts(db) -> dict[str, int]:
    with db.transaction() as session:
        return dict(session.execute(select(MediaItem.state, func.count()).group_by(MediaItem.state)).all())


def test_compaction_removes_only_tombstones_older_than_the_retention_in_batches(catalog, media_root):
    """25 tombstones 40 days old go in batches of 10 (three transactions, each audited); tombstones of
    yesterday, claimed items, held and active items stay; a compacted ID answers not_found, a kept one gone."""
    catalog.set_org("acme", "30d")
    old = seed_items(catalog.db, media_root, "acme", 25, prefix="old")
    recent = seed_items(catalog.db, media_root, "acme", 5, prefix="recent")
    catalog.sweeper.sweep()
    age_tombstones(catalog.db, old, days=40)
    seed_items(catalog.db, media_root, "acme", 3, prefix="held", held=True)
    seed_items(catalog.db, media_root, "acme", 4, prefix="live", expired=False)
    seed_items(catalog.db, media_root, "acme", 2, prefix="claimed")
    catalog.sweeper.claim_expired(10)
    before = counts(catalog.db)

    report = Tombstones(catalog.db, batch_size=10).compact(older_than=timedelta(days=30), actor="test")
    assert (report.removed, report.batches) == (25, 3)
    assert counts(catalog.db) == {**before, State.DELETED.value: before[State.DELETED.value] - 25}
    with pytest.raises(NotFound):
        catalog.lookup(old[0])
    with pytest.raises(Gone):
        catalog.lookup(recent[0])
    entries = catalog.audit.read(action="compact").entries
    assert sorted(entry.details["count"] for entry in entries) == [5, 10, 10]


def test_a_dry_run_counts_and_removes_nothing_and_a_retention_under_a_day_is_refused(catalog, media_root):
    """--dry-run gives the count of what would go; an age under a day is refused before anything is read."""
    catalog.set_org("acme", "30d")
    old = seed_items(catalog.db, media_root, "acme", 7, prefix="old")
    catalog.sweeper.sweep()
    age_tombstones(catalog.db, old, days=3)
    report = Tombstones(catalog.db).compact(older_than=timedelta(days=2), actor="test", dry_run=True)
    assert (report.eligible, report.removed) == (7, 0) and counts(catalog.db)[State.DELETED.value] == 7
    with pytest.raises(ValueError):
        Tombstones(catalog.db).compact(older_than=timedelta(hours=23), actor="test")


def test_a_missing_blob_tombstone_stays_until_its_item_expires_so_its_returning_blob_is_kept(catalog, media_root, tmp_path):
    """Reconcile tombstoned an unexpired item whose blob was away, 40 days ago; the item expires in 40 days.
    Compaction (and its dry run) leaves that tombstone and removes an expired one's, so when the blob comes
    back reconcile keeps it until the expiry instead of deleting it as an orphan; after the expiry it goes."""
    catalog.set_org("acme", "90d")
    uploads = tmp_path / "uploads"
    away = register_aged(catalog, "acme", timedelta(days=50), uploads=uploads)
    lost = register_aged(catalog, "acme", timedelta(days=50), ttl="30d", uploads=uploads)
    shutil.move(media_root / away.key, tmp_path / "away")
    (media_root / lost.key).unlink()
    reconciler = Reconciler(catalog.db, catalog.store)
    # Both of the catalog's two items are missing their blob: drift this test means (see test_reconcile.py).
    reconciler.run = functools.partial(reconciler.run, allow_mass_drift=True)
    reconciler.run(grace=timedelta(days=1))  # the expired one is tombstoned at once, the other first seen missing
    with catalog.db.transaction() as session:
        session.execute(update(MediaItem.__table__).where(MediaItem.__table__.c.id == away.id)
                        .values(missing_since=db_now(-86400 - 60)))
    assert reconciler.run(grace=timedelta(days=1)).marked_missing == 1
    age_tombstones(catalog.db, [away.id, lost.id], days=40)

    tombstones = Tombstones(catalog.db)
    assert tombstones.compact(older_than=timedelta(days=30), actor="test", dry_run=True).eligible == 1
    assert tombstones.compact(older_than=timedelta(days=30), actor="test").removed == 1
    assert states(catalog, [away.id, lost.id]) == {away.id: State.DELETED.value}
    shutil.move(tmp_path / "away", media_root / away.key)
    wait_until_older([media_root / away.key], timedelta(seconds=1))
    report = reconciler.run(grace=timedelta(seconds=1))
    assert (report.returned_blobs_kept, report.orphans_deleted) == (1, 0) and (media_root / away.key).exists()

    with catalog.db.transaction() as session:
        session.execute(update(MediaItem.__table__).where(MediaItem.__table__.c.id == away.id)
                        .values(expires_at=db_now(-60)))
    assert tombstones.compact(older_than=timedelta(days=30), actor="test").removed == 1
    assert states(catalog, [away.id]) == {}
