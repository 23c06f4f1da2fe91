"""Reconciliation of catalog and store, on SQLite and PostgreSQL with the filesystem store."""

import os
import time
from datetime import timedelta

import pytest

from tests.factories import db_time, register_aged, states
from worker.errors import Gone
from worker.reconcile import Reconciler, TooMany

DAY = timedelta(days=1)


def plant(root, key, age=timedelta(days=2), content=b"orphan"):
    """A blob nobody registered, last written `age` ago."""
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    stamp = time.time() - age.total_seconds()
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def reconciler(catalog):
    return Reconciler(catalog.db, catalog.store)


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


def test_orphan_blobs_older_than_the_grace_are_deleted_and_everything_else_kept(catalog, acme, media_root, reconciler, tmp_path):
    """An old unregistered blob goes; a young one (upload in flight), live items' blobs and a claimed
    item's blob stay."""
    live = register_aged(catalog, acme, timedelta(hours=1), uploads=tmp_path / "up")
    claimed = register_aged(catalog, acme, timedelta(hours=3), ttl="1h", uploads=tmp_path / "up")
    catalog.sweeper.claim_expired(10)
    old = plant(media_root, "stray/old.jpg")
    young = plant(media_root, "stray/young.jpg", age=timedelta(minutes=5))
    report = reconciler.run(grace=DAY)
    assert (report.orphans, report.orphans_deleted, report.young_blobs_skipped) == (1, 1, 1)
    assert report.orphan_keys == ["stray/old.jpg"] and report.orphan_bytes == 6
    assert not old.exists() and young.exists()
    assert (media_root / live["key"]).exists() and (media_root / claimed["key"]).exists()


def test_active_item_whose_blob_vanished_becomes_a_missing_blob_tombstone(catalog, acme, media_root, reconciler, tmp_path):
    """The item's ID answers 404 with reason missing_blob; items with blobs are untouched."""
    lost = register_aged(catalog, acme, timedelta(hours=1), uploads=tmp_path / "up")
    kept = register_aged(catalog, acme, timedelta(hours=1), uploads=tmp_path / "up")
    (media_root / lost["key"]).unlink()
    report = reconciler.run(grace=DAY)
    assert (report.items_checked, report.missing_blobs, report.marked_missing) == (2, 1, 1)
    with pytest.raises(Gone) as gone:
        catalog.lookup(lost["id"])
    assert gone.value.body["reason"] == "missing_blob"
    assert catalog.lookup(kept["id"])["state"] == "active"


def test_dry_run_reports_drift_and_changes_nothing(catalog, acme, media_root, reconciler, tmp_path):
    """--dry-run counts orphans and missing blobs but deletes and marks nothing."""
    lost = register_aged(catalog, acme, timedelta(hours=1), uploads=tmp_path / "up")
    (media_root / lost["key"]).unlink()
    orphan = plant(media_root, "stray/x")
    report = reconciler.run(grace=DAY, dry_run=True)
    assert (report.orphans, report.missing_blobs, report.orphans_deleted, report.marked_missing) == (1, 1, 0, 0)
    assert orphan.exists() and states(catalog, [lost["id"]]) == {lost["id"]: "active"}


def test_more_orphans_than_the_limit_aborts_with_nothing_deleted(catalog, acme, media_root, reconciler):
    """Pointed at the wrong database every blob looks orphaned: above --max-orphans nothing is touched."""
    planted = [plant(media_root, f"old/{n}") for n in range(5)]
    with pytest.raises(TooMany, match="nothing was changed"):
        reconciler.run(grace=DAY, max_orphans=4)
    assert all(path.exists() for path in planted)


def test_more_missing_blobs_than_the_limit_aborts_with_nothing_marked(catalog, acme, media_root, reconciler, tmp_path):
    """An unmounted volume makes every blob look missing: above --max-missing no item is tombstoned."""
    items = [register_aged(catalog, acme, timedelta(hours=1), uploads=tmp_path / "up") for _ in range(4)]
    for item in items:
        (media_root / item["key"]).unlink()
    with pytest.raises(TooMany, match="nothing was changed"):
        reconciler.run(grace=DAY, max_missing=3)
    assert set(states(catalog, [item["id"] for item in items]).values()) == {"active"}


def test_blob_registered_between_listing_and_deletion_is_not_deleted(catalog, acme, media_root, reconciler):
    """The orphan list is re-checked against the catalog right before deleting."""
    from worker.reconcile import ReconcileReport

    path = plant(media_root, "import/late.jpg")
    report = ReconcileReport(dry_run=False, grace_seconds=0)
    orphans = reconciler._find_orphans(report, cutoff=db_time(catalog), limit=10)
    assert orphans == [("import/late.jpg", 6)]
    catalog.register(org=acme, key="import/late.jpg")
    reconciler._delete_orphans(report, orphans)
    assert path.exists() and report.orphans_deleted == 0
