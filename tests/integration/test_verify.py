"""`verify`: every breach kind planted and detected, on SQLite and PostgreSQL, on a filesystem and on S3."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from tests.factories import (expiring_in, plant_blob, register_aged, seed_items, wait_past, wait_until_blocked_by,
                             wait_until_older)
from tests.s3 import PREFIX
from worker import items as items_sql
from worker import verify as verify_module
from worker.db import db_now
from worker.models import AuditEvent, MediaItem, Organization
from worker.sweep import ClaimedItem
from worker.verify import BREACH_KINDS, OutOfOrder, Verifier

DAY = timedelta(days=1)


class FsBlobs:
    """Plants and removes blobs straight on the media root, behind the store's back. A blob's age is
    its change time, which cannot be back-dated, so "old" here means older than a one-second grace."""

    grace = timedelta(seconds=1)

    def __init__(self, root: Path):
        self.root = root
        self._old: list[Path] = []

    def put(self, key: str, content: bytes = b"planted", old: bool = False) -> None:
        path = plant_blob(self.root, key, content)
        if old:
            self._old.append(path)

    def wait_old(self) -> None:
        """Return once every blob planted `old` is older than the grace."""
        wait_until_older(self._old, self.grace)

    def remove(self, key: str) -> None:
        (self.root / key).unlink()


class S3Blobs:
    grace = DAY

    def __init__(self, objects, bucket: str):
        self.objects, self.bucket = objects, bucket

    def put(self, key: str, content: bytes = b"planted", old: bool = False) -> None:
        self.objects.raw.delete_object(Bucket=self.bucket, Key=f"{PREFIX}/{key}")
        self.objects.put(self.bucket, [f"{PREFIX}/{key}"], content, age=2 * DAY if old else None)

    def wait_old(self) -> None:
        """LastModified was set two days back when the blob was planted."""

    def remove(self, key: str) -> None:
        self.objects.raw.delete_object(Bucket=self.bucket, Key=f"{PREFIX}/{key}")


@pytest.fixture(params=["fs", "s3"])
def setup(request, database):
    """(catalog, blobs) on the filesystem store or on an S3 bucket, each on SQLite and PostgreSQL."""
    if request.param == "fs":
        return request.getfixturevalue("catalog"), FsBlobs(request.getfixturevalue("media_root"))
    return request.getfixturevalue("s3_catalog"), S3Blobs(request.getfixturevalue("objects"), request.getfixturevalue("bucket"))


@pytest.fixture
def catalog_under_test(setup):
    catalog, _ = setup
    catalog.set_org("acme", "30d")
    return catalog


@pytest.fixture
def blobs(setup):
    return setup[1]


def run_verify(catalog, **options):
    options.setdefault("grace", DAY)
    options.setdefault("stuck_after", timedelta(minutes=3))
    return Verifier(catalog.db, catalog.store).run(**options)


def only(report, kind):
    """The report's breaches are exactly one kind (and no check errors)."""
    found = {name: count for name, count in report.breaches.items() if count}
    return list(found) == [kind] and report.check_errors == 0


def set_row(catalog, media_id, **values):
    table = MediaItem.__table__
    with catalog.db.transaction() as session:
        session.execute(update(table).where(table.c.id == media_id).values(**values))


def test_a_catalog_in_step_with_its_store_is_clean(catalog_under_test, blobs, tmp_path):
    """Active, held, swept, purged and claimed items and a young unregistered blob: no breach, exit status clean."""
    catalog = catalog_under_test
    register_aged(catalog, "acme", timedelta(hours=1), uploads=tmp_path)
    held = expiring_in(catalog, "acme", 3, uploads=tmp_path)
    catalog.set_hold(held=True, reason="case 7", ids=[held.id])
    wait_past(catalog, held)
    register_aged(catalog, "acme", timedelta(hours=3), ttl="1h", uploads=tmp_path)
    purged = register_aged(catalog, "acme", timedelta(hours=1), uploads=tmp_path)
    catalog.sweeper.sweep()
    catalog.purge(ids=[purged.id])
    register_aged(catalog, "acme", timedelta(hours=3), ttl="1h", uploads=tmp_path)
    catalog.sweeper.claim_expired(10)  # claimed, blob still there, lease running: a deletion in flight
    blobs.put("uploads/in-flight.jpg")
    report = run_verify(catalog, grace=blobs.grace)
    assert report.clean, report.to_dict()
    assert (report.items_checked, report.blobs_listed, report.notices["young_blobs"]) == (5, 4, 1)


def test_an_active_item_without_its_blob_is_a_missing_blob_breach(catalog_under_test, blobs, tmp_path):
    """The blob of an active item vanished: reported by id, with whether it is held."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    blobs.remove(item.key)
    report = run_verify(catalog_under_test)
    assert only(report, "missing_blob") and report.breaches["missing_blob"] == 1
    assert (report.examples["missing_blob"][0]["id"], report.examples["missing_blob"][0]["held"]) == (item.id, False)


def test_a_tombstone_whose_blob_exists_is_a_leak(catalog_under_test, blobs, tmp_path):
    """A purged item's blob written back at its key: tombstone_with_blob."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    catalog_under_test.purge(ids=[item.id])
    blobs.put(item.key, b"media bytes")
    report = run_verify(catalog_under_test)
    assert only(report, "tombstone_with_blob")
    assert report.examples["tombstone_with_blob"][0]["reason"] == "purge"


def test_a_returned_blob_of_an_unexpired_missing_blob_tombstone_is_a_notice_not_a_breach(catalog_under_test, blobs, tmp_path):
    """Reconcile keeps such a blob until the item's expiry, so before it verify only counts it."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    set_row(catalog_under_test, item.id, state="deleted", deletion_reason="missing_blob", claimed_at=db_now(), deleted_at=db_now())
    report = run_verify(catalog_under_test)
    assert report.clean and report.notices["returned_blobs"] == 1
    set_row(catalog_under_test, item.id, expires_at=db_now(-60), created_at=db_now(-60 - 30 * 86400))
    assert only(run_verify(catalog_under_test), "tombstone_with_blob")


def test_an_unregistered_blob_older_than_the_grace_is_an_orphan_and_a_younger_one_is_not(catalog_under_test, blobs):
    """Age decides: older than the grace is an orphan, younger is an upload in flight."""
    blobs.put("stray/old.bin", old=True)
    blobs.wait_old()
    blobs.put("stray/young.bin")
    report = run_verify(catalog_under_test, grace=blobs.grace)
    assert only(report, "orphan_blob") and report.breaches["orphan_blob"] == 1
    assert report.examples["orphan_blob"][0]["key"] == "stray/old.bin" and report.notices["young_blobs"] == 1


def test_a_blob_of_another_size_than_recorded_is_a_size_mismatch(catalog_under_test, blobs, tmp_path):
    """The catalog says 11 bytes, the store holds 3."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    blobs.put(item.key, b"abc")
    report = run_verify(catalog_under_test)
    assert only(report, "size_mismatch")
    assert (report.examples["size_mismatch"][0]["size"], report.examples["size_mismatch"][0]["blob_size"]) == (11, 3)


def test_a_ttl_item_deleted_before_its_ttl_ran_out_is_an_early_deletion(catalog_under_test, blobs, tmp_path):
    """Tombstoned for `ttl` one hour after creation with a 2 h TTL: early by about an hour."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=1), ttl="2h", uploads=tmp_path)
    blobs.remove(item.key)
    set_row(catalog_under_test, item.id, state="deleted", deletion_reason="ttl", claimed_at=db_now(), deleted_at=db_now())
    report = run_verify(catalog_under_test)
    assert only(report, "early_deletion")
    assert 3500 < report.examples["early_deletion"][0]["early_by_seconds"] <= 3600


def test_a_sweep_after_a_wrongly_rewritten_expiry_is_an_early_deletion(catalog_under_test, tmp_path):
    """The org keeps 30 d, unchanged for a day, but the item's expiry was moved to an hour ago: first
    wrong_expiry, and once a real sweep deleted it, early_deletion (the org's retention did not change since).
    (An expiry that passed before the org's last change could be one that change rightly left alone.)"""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=2), uploads=tmp_path)
    with catalog_under_test.db.transaction() as session:
        session.execute(update(Organization).where(Organization.id == "acme").values(updated_at=db_now(-86400)))
    set_row(catalog_under_test, item.id, expires_at=db_now(-3600))
    assert only(run_verify(catalog_under_test), "wrong_expiry")
    assert catalog_under_test.sweeper.sweep().deleted == 1
    report = run_verify(catalog_under_test)
    assert only(report, "early_deletion") and report.examples["early_deletion"][0]["reason"] == "retention"


def test_a_retention_change_after_the_deletion_is_not_an_early_deletion(catalog_under_test, tmp_path):
    """Deleted under a 1 h retention, the org moved to 30 d afterwards: the deletion was on time."""
    catalog_under_test.set_org("short", "1h")
    register_aged(catalog_under_test, "short", timedelta(hours=2), uploads=tmp_path)
    assert catalog_under_test.sweeper.sweep().deleted == 1
    catalog_under_test.set_org("short", "30d")
    assert run_verify(catalog_under_test).clean


def test_an_item_deleted_while_it_carries_a_hold_is_a_held_deleted_breach(catalog_under_test, blobs, tmp_path):
    """A row with held_at set that is no longer active."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    catalog_under_test.set_hold(held=True, reason="litigation", ids=[item.id])
    blobs.remove(item.key)
    set_row(catalog_under_test, item.id, state="deleted", deletion_reason="purge", claimed_at=db_now(), deleted_at=db_now())
    assert only(run_verify(catalog_under_test), "held_deleted")


def test_an_item_of_a_held_org_claimed_after_the_hold_is_a_breach_and_one_claimed_before_is_not(catalog_under_test, blobs, tmp_path):
    """The documented exception: an item already claimed when its org was held finishes its deletion."""
    before = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    after = register_aged(catalog_under_test, "acme", timedelta(hours=1), uploads=tmp_path)
    catalog_under_test.purge(ids=[before.id])
    catalog_under_test.set_hold(held=True, reason="audit", org="acme")
    assert run_verify(catalog_under_test).clean
    blobs.remove(after.key)
    set_row(catalog_under_test, after.id, state="deleted", deletion_reason="missing_blob", org_held=False,
            claimed_at=db_now(5), deleted_at=db_now(5))
    report = run_verify(catalog_under_test)
    assert only(report, "held_deleted") and report.examples["held_deleted"][0]["id"] == after.id


def claims_racing(catalog, change: Callable[[], object]) -> list[ClaimedItem]:
    """Race `change` (an operator's hold or retention change) against two sweep claims of the org's
    expired items, the way a busy fleet does, and finish their deletions; returns what was claimed.

    The first claim locks the first item and stays open; `change` starts on a thread and waits for that
    row; a second claim, begun after `change` began, takes the other items (the change has not reached
    them) and commits; then the first commits, and `change` goes on to take effect and commit."""
    claims = items_sql.Claims(catalog.db.sql, lease_seconds=300)
    token = secrets.token_hex(16)
    failures: list[BaseException] = []

    def run_change():
        try:
            change()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the assertion below
            failures.append(exc)

    changer = threading.Thread(target=run_change)
    with catalog.db.transaction() as session:
        first = [ClaimedItem(*row[:-1], token) for row in claims.expired(session, token, 1)]
        pid = session.scalar(text("SELECT pg_backend_pid()"))
        changer.start()
        wait_until_blocked_by(catalog.db, pid)
        rest = catalog.sweeper.claim_expired(100)
    changer.join(timeout=30)
    assert not changer.is_alive() and not failures, failures
    claimed = first + rest
    assert len(first) == 1 and len(rest) >= 1, "the second claim should have taken the items the change had not reached"
    assert catalog.sweeper.process(claimed).deleted == len(claimed)
    return claimed


def claim_times(catalog, claimed: list[ClaimedItem]) -> list:
    with catalog.db.transaction() as session:
        return list(session.scalars(select(MediaItem.claimed_at).where(MediaItem.id.in_([item.id for item in claimed]))))


def latest_event(catalog, action: str) -> AuditEvent:
    with catalog.db.transaction() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id.desc())).first()


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_an_org_hold_placed_while_claims_of_expired_items_are_open_covers_none_and_their_deletions_are_clean(
        database, catalog, media_root):
    """Expired items, one claimed (its transaction open) when the org goes on hold: the hold neither waits for the
    claim nor covers any of them (expired is final), the sweep deletes them all, and verify calls none of the
    deletions held_deleted, those claimed after the hold included; the org's held_at is when the hold took effect."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 6)
    token = secrets.token_hex(16)
    with catalog.db.transaction() as session:
        first = [ClaimedItem(*row[:-1], token) for row in
                 items_sql.Claims(catalog.db.sql, lease_seconds=300).expired(session, token, 1)]
        holder = threading.Thread(target=lambda: catalog.set_hold(held=True, reason="litigation", org="acme"))
        holder.start()
        holder.join(timeout=10)
        assert not holder.is_alive(), "the org hold waited for a claim of an expired item"
    assert catalog.sweeper.process(first).deleted == 1
    assert catalog.sweeper.sweep().deleted == len(ids) - 1
    report = run_verify(catalog)
    assert report.clean and report.breaches["held_deleted"] == 0, report.to_dict()
    with catalog.db.transaction() as session:
        held_at = session.get(Organization, "acme").held_at
    assert held_at == latest_event(catalog, "org_hold").at


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_longer_retention_leaves_expired_items_under_claim_alone_and_their_deletions_are_clean(database, catalog,
                                                                                                   tmp_path):
    """Items expired under a 1 d retention, one claimed (its transaction open) when the org moves to 30 d: the
    change neither waits for the claim nor reschedules any of them (expired is final), the sweep deletes them
    all, and verify calls none of the deletions early, those claimed after the change included."""
    catalog.set_org("acme", "1d")
    ids = [register_aged(catalog, "acme", timedelta(days=2), uploads=tmp_path).id for _ in range(6)]
    token = secrets.token_hex(16)
    with catalog.db.transaction() as session:
        first = [ClaimedItem(*row[:-1], token) for row in
                 items_sql.Claims(catalog.db.sql, lease_seconds=300).expired(session, token, 1)]
        changer = threading.Thread(target=lambda: catalog.set_org("acme", "30d"))
        changer.start()
        changer.join(timeout=10)
        assert not changer.is_alive(), "the retention change waited for a claim of an expired item"
    assert catalog.sweeper.process(first).deleted == 1
    assert catalog.sweeper.sweep().deleted == len(ids) - 1
    report = run_verify(catalog)
    assert report.clean and report.breaches["early_deletion"] == 0, report.to_dict()


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_an_item_hold_that_waited_for_a_claim_of_its_row_is_refused_and_the_deletion_is_clean(database, catalog, media_root):
    """`hold ID` locks the row before it judges it, so a claim that reached the row first wins: the hold
    answers Gone once the claim commits, and the deletion the claim finishes is no breach."""
    from config.errors import Gone

    catalog.set_org("acme", "30d")
    [media_id] = seed_items(catalog.db, media_root, "acme", 1)
    token = secrets.token_hex(16)
    refused: list[BaseException] = []

    def hold():
        try:
            catalog.set_hold(held=True, reason="litigation", ids=[media_id])
        except Gone as exc:
            refused.append(exc)

    holder = threading.Thread(target=hold)
    with catalog.db.transaction() as session:
        rows = items_sql.Claims(catalog.db.sql, lease_seconds=300).expired(session, token, 1)
        holder.start()
        wait_until_blocked_by(catalog.db, session.scalar(text("SELECT pg_backend_pid()")))
    holder.join(timeout=30)
    assert len(refused) == 1 and not holder.is_alive()
    assert catalog.sweeper.process([ClaimedItem(*row[:-1], token) for row in rows]).deleted == 1
    assert run_verify(catalog).clean


def test_a_deletion_whose_lease_ran_out_long_ago_is_stuck(catalog_under_test, tmp_path):
    """Claimed, then nobody swept for longer than stuck_after: stuck_deletion; within it, fine."""
    item = register_aged(catalog_under_test, "acme", timedelta(hours=3), ttl="1h", uploads=tmp_path)
    catalog_under_test.sweeper.claim_expired(10)
    set_row(catalog_under_test, item.id, lease_until=db_now(-60))
    assert run_verify(catalog_under_test).clean
    set_row(catalog_under_test, item.id, lease_until=db_now(-600))
    assert only(run_verify(catalog_under_test), "stuck_deletion")


class _SweepsDuringListing:
    """A store whose listing starts only after a sweep ran: the catalog page verify read first is stale."""

    def __init__(self, catalog):
        self.catalog, self.store = catalog, catalog.store

    def iter_keys(self, **options):
        self.catalog.sweeper.sweep()
        yield from self.store.iter_keys(**options)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_blob_deleted_by_a_concurrent_sweep_is_not_reported_missing(catalog_under_test, tmp_path):
    """The page says active, the listing has no blob, the fresh read says deleted: no breach."""
    register_aged(catalog_under_test, "acme", timedelta(hours=3), ttl="1h", uploads=tmp_path)
    report = Verifier(catalog_under_test.db, _SweepsDuringListing(catalog_under_test)).run(grace=DAY, stuck_after=DAY)
    assert report.clean and report.items_checked == 1


def test_counts_cover_every_breach_and_examples_stop_at_the_limit(catalog_under_test, blobs):
    """Twelve orphans, three named."""
    for number in range(12):
        blobs.put(f"stray/{number:02d}", old=True)
    blobs.wait_old()
    report = run_verify(catalog_under_test, max_examples=3, grace=blobs.grace)
    assert report.breaches["orphan_blob"] == 12 and len(report.examples["orphan_blob"]) == 3


class _Unordered:
    def __init__(self, store):
        self.store = store

    def iter_keys(self, **options):
        return iter(sorted(self.store.iter_keys(), key=lambda blob: blob.key, reverse=True))

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_listing_out_of_key_order_stops_verify_instead_of_misreporting(catalog, media_root):
    """A merge of unordered streams would report nonsense; verify refuses with one sentence."""
    plant_blob(media_root, "a/1")
    plant_blob(media_root, "b/1")
    with pytest.raises(OutOfOrder, match="byte order"):
        Verifier(catalog.db, _Unordered(catalog.store)).run(grace=DAY, stuck_after=DAY)


def test_progress_is_reported_while_verifying(catalog, tmp_path, monkeypatch):
    """Progress lines name the counts so far."""
    catalog.set_org("acme", "30d")
    for _ in range(3):
        register_aged(catalog, "acme", timedelta(hours=1), uploads=tmp_path)
    monkeypatch.setattr(verify_module, "PROGRESS_EVERY_S", 0.0)
    lines: list[str] = []
    Verifier(catalog.db, catalog.store, progress=lines.append).run(grace=DAY, stuck_after=DAY)
    assert lines and lines[-1] == "verified 3 items and 3 blobs, 0 breaches so far"


def test_catalog_pages_are_read_in_order_across_page_boundaries(catalog, monkeypatch):
    """With pages of 7 rows, 50 items in step with their blobs still merge cleanly."""
    monkeypatch.setattr(verify_module, "PAGE", 7)
    from tests.factories import seed_items

    catalog.set_org("acme", "30d")
    seed_items(catalog.db, catalog.store, "acme", 50, expired=False)
    report = run_verify(catalog)
    assert report.clean and (report.items_checked, report.blobs_listed) == (50, 50)


# -- the command ---------------------------------------------------------------------------------


def test_verify_exits_zero_when_clean_and_one_with_counts_and_examples_on_a_breach(cli, data_dir, tmp_path):
    """The CLI: exit 0 and `verify: clean`; after a blob vanished, exit 1 and one JSON object naming it."""
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(b"photo")
    assert cli("org", "set", "acme").code == 0
    item = cli("register", "--org", "acme", "--file", str(upload), "--id", "img-1", "--json").json
    clean = cli("verify")
    assert clean.code == 0 and clean.stdout.rstrip().endswith("verify: clean")
    (data_dir / "media" / item["key"]).unlink()
    broken = cli("verify", "--json")
    assert broken.code == 1
    body = json.loads(broken.stdout)
    assert (body["clean"], body["breaches"]["missing_blob"], body["breaches_total"]) == (False, 1, 1)
    assert body["examples"]["missing_blob"][0]["id"] == "img-1" and set(body["breaches"]) == set(BREACH_KINDS)


def test_verify_with_a_malformed_grace_is_bad_input(cli, data_dir):
    """--grace soon: one sentence, exit 2."""
    result = cli("verify", "--grace", "soon")
    assert result.code == 2 and "malformed duration" in result.stderr and result.stderr.count("\n") == 1


def test_verify_reads_only(cli, data_dir, tmp_path):
    """A verify that finds breaches changes nothing: the same breaches are found again."""
    assert cli("org", "set", "acme").code == 0
    stray = data_dir / "media" / "stray"
    wait_until_older([plant_blob(stray, "old")], timedelta(seconds=1))
    first, second = cli("verify", "--grace", "1s", "--json"), cli("verify", "--grace", "1s", "--json")
    assert first.code == second.code == 1 and (stray / "old").exists()
    assert first.json["breaches"] == second.json["breaches"] and first.json["breaches"]["orphan_blob"] == 1

