"""Reconciliation of catalog and store, on SQLite and PostgreSQL with the filesystem store.

Orphans are aged by their change time, which nobody can set back, so these tests use a grace of a
second and wait until planted blobs are older than that instead of back-dating them.
"""

import functools
import os
import shutil
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.factories import db_time, expiring_in, plant_blob, register_aged, states, wait_past, wait_until_older
from worker.db import db_now
from config.errors import Gone
from worker.models import AuditEvent, MediaItem
from worker.reconcile import Reconciler, TooMany
from worker.status import fleet_status
from worker.verify import Verifier

GRACE = timedelta(seconds=1)
DAY = timedelta(days=1)


@pytest.fixture
def reconciler(catalog):
    """Reconcile on the catalog's store. These tests plant a handful of items and blobs, so nearly all of
    them drift: they accept mass drift (its refusal has tests of its own, which build their own reconciler)."""
    reconciler = Reconciler(catalog.db, catalog.store)
    reconciler.run = functools.partial(reconciler.run, allow_mass_drift=True)
    return reconciler


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "up"


def set_row(catalog, media_id, **values):
    table = MediaItem.__table__
    with catalog.db.transaction() as session:
        session.execute(update(table).where(table.c.id == media_id).values(**values))


def row(catalog, media_id):
    with catalog.db.transaction() as session:
        item = session.get(MediaItem, media_id)
        session.expunge(item)
    return item


def verify(catalog):
    return Verifier(catalog.db, catalog.store).run(grace=GRACE, stuck_after=DAY)


def test_orphan_blobs_older_than_the_grace_are_deleted_and_everything_else_kept(catalog, acme, media_root, reconciler, uploads):
    """An old unregistered blob goes; a young one (upload in flight), live items' blobs and a claimed
    item's blob stay."""
    live = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    claimed = register_aged(catalog, acme, timedelta(hours=3), ttl="1h", uploads=uploads)
    catalog.sweeper.claim_expired(10)
    old = plant_blob(media_root, "stray/old.jpg")
    wait_until_older([old], GRACE)
    young = plant_blob(media_root, "stray/young.jpg")
    report = reconciler.run(grace=GRACE)
    assert (report.orphans, report.orphans_deleted, report.young_blobs_skipped) == (1, 1, 1)
    assert report.orphan_keys == ["stray/old.jpg"] and report.orphan_bytes == 6
    assert not old.exists() and young.exists()
    assert (media_root / live.key).exists() and (media_root / claimed.key).exists()


def test_a_back_dated_modification_time_does_not_make_a_blob_an_orphan(catalog, acme, media_root, reconciler):
    """`touch -d '3 days ago'` on a fresh file: its change time is now, so it is young and kept."""
    fresh = plant_blob(media_root, "import/copied-with-p.jpg")
    stamp = time.time() - 3 * 86400
    os.utime(fresh, (stamp, stamp))
    report = reconciler.run(grace=DAY)
    assert (report.orphans, report.young_blobs_skipped) == (0, 1) and fresh.exists()


def test_an_unheld_unexpired_item_whose_blob_vanished_is_recorded_not_tombstoned(catalog, acme, media_root, reconciler, uploads):
    """First sighting: missing_since is set (database clock), the item stays active and is surfaced."""
    lost = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    kept = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    (media_root / lost.key).unlink()
    report = reconciler.run(grace=DAY)
    assert (report.items_checked, report.missing_blobs, report.missing_first_seen, report.marked_missing) == (2, 1, 1, 0)
    assert states(catalog, [lost.id, kept.id]) == {lost.id: "active", kept.id: "active"}
    assert abs((row(catalog, lost.id).missing_since - db_time(catalog)).total_seconds()) < 60
    assert row(catalog, kept.id).missing_since is None
    assert fleet_status(catalog.db)["missing_blob_items"] == {"count": 1, "held": 0}


def test_a_blob_that_comes_back_clears_the_record_and_nothing_is_lost(catalog, acme, media_root, reconciler, uploads, tmp_path):
    """An operator's `mv` away and back between two reconciles: the item stays active with its blob,
    and verify finds nothing."""
    item = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    away = tmp_path / "away"
    shutil.move(media_root / item.key, away)
    reconciler.run(grace=GRACE)
    shutil.move(away, media_root / item.key)
    wait_until_older([media_root / item.key], GRACE)
    report = reconciler.run(grace=GRACE)
    assert (report.blobs_back, report.missing_blobs, report.orphans_deleted) == (1, 0, 0)
    assert row(catalog, item.id).missing_since is None and catalog.lookup(item.id).state == "active"
    assert (media_root / item.key).exists() and verify(catalog).clean


def test_a_blob_missing_for_longer_than_the_grace_is_tombstoned_and_audited_with_its_id(catalog, acme, media_root, reconciler, uploads):
    """Confirmed (still missing a grace after it was first seen): a missing_blob tombstone, recorded with the ID."""
    lost = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    (media_root / lost.key).unlink()
    reconciler.run(grace=DAY)
    set_row(catalog, lost.id, missing_since=db_now(-86400 - 60))
    report = reconciler.run(grace=DAY)
    assert report.marked_missing == 1 and report.missing_ids == [lost.id]
    with pytest.raises(Gone) as gone:
        catalog.lookup(lost.id)
    assert gone.value.tombstone.reason == "missing_blob"
    with catalog.db.transaction() as session:
        audited = session.scalars(select(AuditEvent.details).where(AuditEvent.action == "reconcile_missing_blob")).all()
    assert [details["ids"] for details in audited] == [[lost.id]]


def test_an_expired_unheld_item_whose_blob_vanished_is_tombstoned_at_once(catalog, acme, media_root, reconciler, uploads):
    """Its time is up anyway: no need to wait for a second sighting."""
    lost = register_aged(catalog, acme, timedelta(hours=3), ttl="1h", uploads=uploads)
    (media_root / lost.key).unlink()
    assert reconciler.run(grace=DAY).marked_missing == 1
    assert states(catalog, [lost.id]) == {lost.id: "deleted"}


@pytest.mark.parametrize("hold", ["item", "org"])
def test_a_held_item_whose_blob_is_missing_is_never_tombstoned_and_keeps_its_blob_when_it_returns(
        catalog, acme, media_root, reconciler, uploads, tmp_path, hold):
    """The audit's repro: an item held before its expiry, now past it, has its blob away during reconciles long
    past the grace; the item stays active and surfaced (report, status, verify), and its returning blob is kept."""
    item = expiring_in(catalog, acme, 3, uploads=uploads)
    catalog.set_hold(held=True, reason="litigation", **({"ids": [item.id]} if hold == "item" else {"org": acme}))
    wait_past(catalog, item)
    away = tmp_path / "away"
    shutil.move(media_root / item.key, away)
    first = reconciler.run(grace=GRACE)
    set_row(catalog, item.id, missing_since=db_now(-86400))
    second = reconciler.run(grace=GRACE)
    assert (first.missing_held, second.missing_held, second.marked_missing) == (1, 1, 0)
    assert second.held_missing_ids == [item.id]
    assert states(catalog, [item.id]) == {item.id: "active"}
    assert fleet_status(catalog.db)["missing_blob_items"] == {"count": 1, "held": 1}
    assert verify(catalog).breaches["missing_blob"] == 1
    shutil.move(away, media_root / item.key)
    wait_until_older([media_root / item.key], GRACE)
    reconciler.run(grace=GRACE)
    assert (media_root / item.key).exists() and catalog.lookup(item.id).state == "active"
    assert verify(catalog).clean


def test_a_hold_placed_after_the_check_still_wins_over_the_tombstone(catalog, acme, media_root, reconciler, uploads, monkeypatch):
    """The tombstone's own statement re-checks holds, so a hold committed mid-run keeps the item active. The item
    is live (a hold can cover it) and its blob has been missing for a day, so the check plans its tombstone."""
    lost = expiring_in(catalog, acme, 600, uploads=uploads)
    (media_root / lost.key).unlink()
    set_row(catalog, lost.id, missing_since=db_now(-86400))
    real_mark = Reconciler._mark_missing

    def hold_first(self, *args, **kwargs):
        catalog.set_hold(held=True, reason="just in time", ids=[lost.id])
        return real_mark(self, *args, **kwargs)

    monkeypatch.setattr(Reconciler, "_mark_missing", hold_first)
    assert reconciler.run(grace=GRACE).marked_missing == 0
    assert states(catalog, [lost.id]) == {lost.id: "active"}


def test_the_returned_blob_of_an_unexpired_missing_blob_tombstone_is_kept_until_the_item_expires(catalog, acme, media_root, reconciler, uploads):
    """A tombstone protects its returned blob until expiry (reported), then reconcile deletes it as a leak."""
    item = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    set_row(catalog, item.id, state="deleted", deletion_reason="missing_blob", claimed_at=db_now(), deleted_at=db_now())
    wait_until_older([media_root / item.key], GRACE)
    kept = reconciler.run(grace=GRACE)
    assert (kept.returned_blobs_kept, kept.leaks_deleted) == (1, 0) and (media_root / item.key).exists()
    set_row(catalog, item.id, expires_at=db_now(-60))
    gone = reconciler.run(grace=GRACE)
    assert (gone.returned_blobs_kept, gone.leaks_deleted) == (0, 1) and not (media_root / item.key).exists()


def test_a_purged_items_leftover_blob_is_deleted_as_a_leak(catalog, acme, media_root, reconciler, uploads):
    """A blob at a purge tombstone's key (a crash between delete and finalize elsewhere) goes at once."""
    item = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    catalog.purge(ids=[item.id])
    plant_blob(media_root, item.key)
    report = reconciler.run(grace=DAY)
    assert (report.leaks_deleted, report.orphans) == (1, 0) and not (media_root / item.key).exists()
    assert verify(catalog).clean


def test_dry_run_reports_drift_and_changes_nothing(catalog, acme, media_root, reconciler, uploads):
    """--dry-run counts orphans and missing blobs but deletes, records and marks nothing."""
    lost = register_aged(catalog, acme, timedelta(hours=3), ttl="1h", uploads=uploads)
    (media_root / lost.key).unlink()
    orphan = plant_blob(media_root, "stray/x")
    wait_until_older([orphan], GRACE)
    report = reconciler.run(grace=GRACE, dry_run=True)
    assert (report.orphans, report.missing_blobs, report.orphans_deleted, report.marked_missing) == (1, 1, 0, 0)
    assert orphan.exists() and states(catalog, [lost.id]) == {lost.id: "active"}
    assert row(catalog, lost.id).missing_since is None


def test_more_orphans_than_the_limit_aborts_with_nothing_deleted(catalog, acme, media_root, reconciler):
    """Pointed at the wrong database every blob looks orphaned: above --max-orphans nothing is touched."""
    planted = [plant_blob(media_root, f"old/{n}") for n in range(5)]
    wait_until_older(planted, GRACE)
    with pytest.raises(TooMany, match="nothing was changed"):
        reconciler.run(grace=GRACE, max_orphans=4)
    assert all(path.exists() for path in planted)


def test_more_missing_blobs_than_the_limit_aborts_with_nothing_marked(catalog, acme, media_root, reconciler, uploads):
    """An unmounted volume makes every blob look missing: above --max-missing no item is tombstoned or recorded."""
    items = [register_aged(catalog, acme, timedelta(hours=3), ttl="1h", uploads=uploads) for _ in range(4)]
    for item in items:
        (media_root / item.key).unlink()
    with pytest.raises(TooMany, match="nothing was changed"):
        reconciler.run(grace=DAY, max_missing=3)
    assert set(states(catalog, [item.id for item in items]).values()) == {"active"}
    assert all(row(catalog, item.id).missing_since is None for item in items)


def test_blob_registered_between_listing_and_deletion_is_not_deleted(catalog, acme, media_root, reconciler, monkeypatch):
    """The orphan list is re-checked against the catalog right before deleting."""
    path = plant_blob(media_root, "import/late.jpg")
    wait_until_older([path], GRACE)
    real_delete = Reconciler._delete_blobs

    def register_first(self, *args, **kwargs):
        catalog.register(org=acme, key="import/late.jpg")
        return real_delete(self, *args, **kwargs)

    monkeypatch.setattr(Reconciler, "_delete_blobs", register_first)
    report = reconciler.run(grace=GRACE)
    assert path.exists() and (report.orphans, report.orphans_deleted) == (1, 0)


def test_the_exporter_reports_active_items_whose_blob_is_missing(catalog, acme, media_root, reconciler, uploads):
    """media_retention_missing_blob_items follows what reconcile recorded."""
    from worker.exporter import FleetStatusCollector

    def gauge():
        (family,) = [f for f in FleetStatusCollector(catalog.db).collect() if f.name == "media_retention_missing_blob_items"]
        return family.samples[0].value

    lost = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    assert gauge() == 0
    (media_root / lost.key).unlink()
    reconciler.run(grace=DAY)
    assert gauge() == 1


def test_temporary_files_of_a_killed_upload_are_removed_once_older_than_the_grace(catalog, acme, media_root, reconciler):
    """`.incoming-*` files are ours by name: every listing skips them, reconcile discards the old ones
    (verify names them until then) and leaves a young one (an upload in flight) alone."""
    old = plant_blob(media_root, "ab/cd/.incoming-0123456789abcdef", b"half a jpeg")
    wait_until_older([old], GRACE)
    young = plant_blob(media_root, "ab/ef/.incoming-fedcba9876543210", b"uploading")
    assert verify(catalog).breaches["abandoned_upload"] == 1
    report = reconciler.run(grace=GRACE)
    assert (report.partial_uploads, report.partial_uploads_discarded, report.orphans) == (1, 1, 0)
    assert not old.exists() and young.exists()
    assert verify(catalog).clean
