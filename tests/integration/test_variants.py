"""Derived files (variants) of an item: thumbnails, previews, transcodes that live and go with it.

On a filesystem volume and on an S3 server (moto, on loopback), each on SQLite and PostgreSQL: a sweep or a
purge deletes the item's blob and every variant's before the tombstone; a failing variant keeps the item
`deleting` and retried; reconcile never calls a live item's variant an orphan and deletes a tombstone's
leaked variants; verify reports leftovers and missing variants; keys are unique across items and variants."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from config.errors import BadInput, Gone, NotFound
from tests.factories import (database_time, end_leases, plant_blob, wait_past, rows_by_id, seed_items, seed_variants, states,
                             variant_keys)
from tests.s3 import PREFIX, s3_settings_for
from worker.catalog import Catalog
from worker.catalog.manifest import ManifestError
from worker.engine import build
from worker.models import MediaItem, MediaVariant, Reason
from worker.reconcile import Reconciler
from worker.store import DeleteResult
from worker.store.fs import FilesystemStore
from worker.store.s3 import S3Store
from worker.sweep import Sweeper
from worker.tombstones import Tombstones
from worker.verify import Verifier

DAY = timedelta(days=1)


@dataclass
class Backend:
    """A catalog on one kind of store, and how a test plants and sees blobs there behind its back."""

    name: str
    catalog: Catalog
    put: Callable[[str, bytes], None]
    present: Callable[[], set[str]]  # the keys that have a blob now


@pytest.fixture(params=["filesystem", "s3"])
def backend(request, database) -> Backend:
    if request.param == "filesystem":
        catalog, root = request.getfixturevalue("catalog"), request.getfixturevalue("media_root")
        return Backend("filesystem", catalog, lambda key, body: plant_blob(root, key, body),
                       lambda: {str(path.relative_to(root)) for path in root.rglob("*")
                                if path.is_file() and not path.name.startswith(".media-retention")})
    catalog, objects, bucket = (request.getfixturevalue(name) for name in ("s3_catalog", "objects", "bucket"))
    return Backend("s3", catalog, objects.writer(bucket),
                   lambda: {name.removeprefix(f"{PREFIX}/") for name in objects.names(bucket, f"{PREFIX}/")})


def register_with_variants(backend: Backend, media_id: str, variants: list[str], *, expired: bool = True,
                           item_size: int = 10, variant_size: int = 4, expires_in: float | None = None):
    """An item adopted by key with its variants, all blobs planted first; expired two hours ago (1 h TTL) or fresh,
    or (`expires_in`) expiring that many seconds from now."""
    key = f"media/{media_id}.jpg"
    backend.put(key, b"i" * item_size)
    for variant in variants:
        backend.put(variant, b"v" * variant_size)
    created = database_time(backend.catalog.db) - (timedelta(hours=2) if expired else timedelta(0))
    if expires_in is not None:
        created = database_time(backend.catalog.db) - timedelta(hours=1) + timedelta(seconds=expires_in)
    return backend.catalog.register(org="acme", key=key, media_id=media_id, ttl="1h", created_at=created, variants=variants)


@pytest.fixture
def acme(backend):
    backend.catalog.set_org("acme", "30d")
    return backend


def test_a_sweep_deletes_an_expired_item_with_every_variant_and_leaves_a_live_items_variants(acme):
    """The expired item's blob and both variants go before its tombstone (counted and audited); the live item keeps all."""
    catalog = acme.catalog
    old = register_with_variants(acme, "old", ["thumbs/old.webp", "previews/old.mp4"])
    live = register_with_variants(acme, "live", ["thumbs/live.webp"], expired=False)
    assert [variant.key for variant in old.variants] == ["thumbs/old.webp", "previews/old.mp4"]

    counts = catalog.sweeper.sweep()
    assert (counts.claimed, counts.deleted, counts.failed, counts.variants_deleted) == (1, 1, 0, 2)
    assert counts.bytes_freed == 10 + 2 * 4
    assert states(catalog, ["old", "live"]) == {"old": "deleted", "live": "active"}
    assert acme.present() == {live.key, "thumbs/live.webp"}
    deleted = catalog.audit.read(action="deleted").entries
    assert [(entry.details["count"], entry.details.get("variants")) for entry in deleted] == [(1, 2)]


class FlakyVariantStore(FilesystemStore):
    """Fails the first delete of chosen keys, like a disk having a bad minute."""

    def __init__(self, root, bad_keys):
        super().__init__(root, delete_threads=2)
        self.remaining = set(bad_keys)

    def delete_many(self, keys):
        results = super().delete_many([key for key in keys if key not in self.remaining])
        answered = {result.key: result for result in results}
        failed = {key: DeleteResult(key, ok=False, error="EIO: injected") for key in keys if key in self.remaining}
        self.remaining -= set(failed)
        return [failed.get(key) or answered[key] for key in keys]


def test_a_failing_variant_delete_keeps_its_item_deleting_until_a_later_sweep_deletes_it(catalog, media_root, monkeypatch):
    """One variant's delete fails: the item stays `deleting` with that variant named in its error and is not
    tombstoned; once its backoff ends a sweep deletes what is left and tombstones it."""
    monkeypatch.setattr("worker.sweep.BACKOFF_BASE_SECONDS", 1)
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 3)
    seed_variants(catalog.db, media_root, {media_id: [f"thumbs/{media_id}.webp"] for media_id in ids})
    sweeper = Sweeper(catalog.db, FlakyVariantStore(media_root, [f"thumbs/{ids[1]}.webp"]),
                      claim_lease=timedelta(minutes=5), batch_size=100)

    first = sweeper.sweep()
    assert (first.deleted, first.failed) == (2, 1)
    row = rows_by_id(catalog, [ids[1]])[ids[1]]
    assert (row.state, row.attempts) == ("deleting", 1)
    assert row.last_error == f"variant thumbs/{ids[1]}.webp: EIO: injected"
    assert (media_root / f"thumbs/{ids[1]}.webp").exists()
    time.sleep(1.2)
    second = sweeper.sweep()
    assert (second.claimed, second.deleted, second.variants_deleted) == (1, 1, 1)
    assert states(catalog, ids) == dict.fromkeys(ids, "deleted")
    assert not (media_root / "thumbs" / f"{ids[1]}.webp").exists()


def test_a_variant_the_bucket_refuses_to_delete_keeps_its_item_deleting_and_it_goes_once_allowed(
        pg_s3_catalog, objects, bucket, raw_s3):
    """On S3 a per-key AccessDenied on one variant (a bucket policy) fails only its item; after the policy is
    lifted and the backoff ends, a sweep finishes it."""
    catalog = pg_s3_catalog
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, objects.writer(bucket), "acme", 4)
    seed_variants(catalog.db, objects.writer(bucket), {media_id: [f"thumbs/{media_id}.webp"] for media_id in ids})
    raw_s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject",
        "Resource": f"arn:aws:s3:::{bucket}/{PREFIX}/thumbs/{ids[2]}.webp"}]}))

    first = catalog.sweeper.sweep()
    assert (first.deleted, first.failed) == (3, 1)
    row = rows_by_id(catalog, [ids[2]])[ids[2]]
    assert row.state == "deleting" and "AccessDenied" in row.last_error and f"thumbs/{ids[2]}.webp" in row.last_error
    assert objects.names(bucket, f"{PREFIX}/") == {f"{PREFIX}/thumbs/{ids[2]}.webp"}
    raw_s3.delete_bucket_policy(Bucket=bucket)
    end_leases(catalog.db)
    assert catalog.sweeper.sweep().deleted == 1
    assert objects.names(bucket, f"{PREFIX}/") == set()
    assert states(catalog, ids) == dict.fromkeys(ids, "deleted")


def test_a_purge_deletes_the_items_variants_with_it(acme):
    """purge of an unexpired item takes its variants; another item's stay."""
    register_with_variants(acme, "gone", ["thumbs/gone.webp", "thumbs/gone-2.webp"], expired=False)
    kept = register_with_variants(acme, "kept", ["thumbs/kept.webp"], expired=False)
    result = acme.catalog.purge(ids=["gone"], actor="test", reason="request")
    assert result.to_dict()["deleted"] == 1
    assert acme.present() == {kept.key, "thumbs/kept.webp"}


def test_reconcile_leaves_live_variants_alone_and_deletes_the_leaked_variants_of_a_tombstone(acme):
    """A variant of an active item or of one being deleted is no orphan however old; a tombstone's variant that
    came back is a leak and goes; an unknown blob beside them is still an orphan."""
    catalog = acme.catalog
    register_with_variants(acme, "live", ["thumbs/live.webp"], expired=False)
    register_with_variants(acme, "old", ["thumbs/old.webp"])
    register_with_variants(acme, "claimed", ["thumbs/claimed.webp"])
    catalog.sweeper.claim_ids(["claimed"], reason=Reason.PURGE)
    catalog.sweeper.drain(limit=1)  # the expired "old" item: tombstoned with its variant gone
    assert states(catalog, ["old", "claimed"]) == {"old": "deleted", "claimed": "deleting"}
    acme.put("thumbs/old.webp", b"back")  # e.g. a restore from backup brought it back
    acme.put("stray/orphan.bin", b"orphan")
    time.sleep(1.1)  # every blob older than the grace

    report = Reconciler(catalog.db, catalog.store).run(grace=timedelta(seconds=1), allow_mass_drift=True)
    assert (report.orphans_deleted, report.leaks_deleted) == (1, 1)
    assert report.orphan_keys == ["stray/orphan.bin"] and report.leaked_keys == ["thumbs/old.webp"]
    assert {"thumbs/live.webp", "thumbs/claimed.webp"} <= acme.present()
    assert "thumbs/old.webp" not in acme.present()


def test_verify_reports_a_tombstones_leftover_variant_and_an_active_items_missing_variant(acme):
    """A variant blob left behind a tombstone is `tombstone_with_blob`, a missing variant of an active item
    `missing_blob`, each naming the item it belongs to; with both set right verify is clean again."""
    catalog = acme.catalog
    register_with_variants(acme, "old", ["thumbs/old.webp"])
    live = register_with_variants(acme, "live", ["thumbs/live.webp", "thumbs/live-2.webp"], expired=False)
    catalog.sweeper.sweep()
    acme.put("thumbs/old.webp", b"back")
    catalog.store.delete_many(["thumbs/live-2.webp"])

    report = Verifier(catalog.db, catalog.store).run(grace=DAY, stuck_after=DAY)
    assert (report.breaches["tombstone_with_blob"], report.breaches["missing_blob"]) == (1, 1)
    leftover = report.examples["tombstone_with_blob"][0]
    assert {name: leftover[name] for name in ("id", "org", "key", "state", "variant_of", "reason")} == {
        "id": "old", "org": "acme", "key": "thumbs/old.webp", "state": "deleted", "variant_of": "media/old.jpg",
        "reason": "ttl"}
    assert report.examples["missing_blob"][0]["variant_of"] == live.key
    assert (report.items_checked, report.variants_checked) == (2, 3)

    catalog.store.delete_many(["thumbs/old.webp"])
    acme.put("thumbs/live-2.webp", b"v" * 4)
    assert Verifier(catalog.db, catalog.store).run(grace=DAY, stuck_after=DAY).clean


def test_keys_are_unique_across_items_and_variants(acme):
    """A variant cannot take an item's key, an item cannot take a variant's, and one registration cannot name a key
    twice; each refusal registers nothing."""
    catalog = acme.catalog
    item = register_with_variants(acme, "first", ["thumbs/first.webp"], expired=False)
    acme.put("media/second.jpg", b"x")
    with pytest.raises(BadInput, match="already belongs"):
        catalog.register(org="acme", key="media/second.jpg", media_id="second", variants=[item.key])
    with pytest.raises(BadInput, match="already belongs"):
        catalog.register(org="acme", key="thumbs/first.webp", media_id="third")
    with pytest.raises(BadInput, match="given twice"):
        catalog.register(org="acme", key="media/second.jpg", media_id="fourth", variants=["media/second.jpg"])
    with pytest.raises(BadInput, match="already belongs"):
        catalog.add_variants("first", [item.key])
    with pytest.raises(BadInput, match="invalid storage key"):
        catalog.register(org="acme", key="media/second.jpg", media_id="fifth", variants=[".media-retention-x"])
    with pytest.raises(BadInput, match="no blob at variant key"):
        catalog.register(org="acme", key="media/second.jpg", media_id="sixth", variants=["thumbs/none.webp"])
    with pytest.raises(NotFound):
        catalog.lookup("second")
    assert variant_keys(catalog.db) == {"thumbs/first.webp"}


def test_a_variant_is_added_to_an_active_or_held_item_and_refused_for_a_gone_one(acme):
    """`variant add` adopts a stored blob for an active item (held past its expiry too, audited); an item past its
    expiry or deleted is gone (exit 3's error) and gets nothing."""
    catalog = acme.catalog
    register_with_variants(acme, "live", [], expired=False)
    held = register_with_variants(acme, "held", [], expires_in=3)
    catalog.set_hold(held=True, reason="case 7", ids=["held"], actor="legal")  # before it expires
    wait_past(catalog, held)
    register_with_variants(acme, "expired", [])
    for key in ("thumbs/a.webp", "thumbs/b.webp", "thumbs/c.webp"):
        acme.put(key, b"t" * 3)

    added = catalog.add_variants("live", ["thumbs/a.webp"])
    assert [variant.to_dict() for variant in added] == [{"key": "thumbs/a.webp", "size": 3, "mime": "image/webp"}]
    catalog.add_variants("held", ["thumbs/b.webp"])
    with pytest.raises(Gone):
        catalog.add_variants("expired", ["thumbs/c.webp"])
    with pytest.raises(NotFound):
        catalog.add_variants("never", ["thumbs/c.webp"])
    assert variant_keys(catalog.db) == {"thumbs/a.webp", "thumbs/b.webp"}
    assert [entry.details["count"] for entry in catalog.audit.read(action="variant_add").entries] == [1, 1]
    assert catalog.sweeper.sweep().deleted == 1  # the expired one; the held one and its variant stay
    assert {"thumbs/b.webp", "thumbs/c.webp"} <= acme.present()


def test_lookup_lists_the_variants_and_presigns_each_no_longer_than_the_item(pg_s3_catalog, objects, bucket):
    """lookup lists key, size and MIME of each variant; lookup --url signs each variant for exactly as long as
    the item's own URL, capped at the item's expiry."""
    catalog = pg_s3_catalog
    catalog.set_org("acme", "30d")
    objects.put(bucket, [f"{PREFIX}/media/a.jpg"], b"x" * 10)
    objects.put(bucket, [f"{PREFIX}/thumbs/a.webp"], b"t" * 3)
    created = database_time(catalog.db) - timedelta(minutes=50)
    catalog.register(org="acme", key="media/a.jpg", media_id="a", ttl="1h", created_at=created, variants=["thumbs/a.webp"])

    assert catalog.lookup("a").to_dict()["variants"] == [{"key": "thumbs/a.webp", "size": 3, "mime": "image/webp"}]
    signed = catalog.presigned_url("a").to_dict()
    assert 500 < signed["expires_in"] <= 600
    [variant] = signed["variants"]
    assert f"/{PREFIX}/thumbs/a.webp?" in variant["url"]
    assert f"X-Amz-Expires={signed['expires_in']}" in variant["url"] and f"X-Amz-Expires={signed['expires_in']}" in signed["url"]


def test_compaction_removes_a_tombstones_variant_rows_and_reconcile_then_sees_a_leftover_as_an_orphan(catalog, media_root):
    """Compacting a tombstone removes its variant rows with it; a variant blob that came back after that is no
    longer anyone's and reconcile deletes it as an orphan (after its grace), never as a live blob."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 2)
    seed_variants(catalog.db, media_root, {ids[0]: ["thumbs/0.webp"], ids[1]: ["thumbs/1.webp"]})
    catalog.sweeper.sweep()
    deleted_at = rows_by_id(catalog, [ids[0]])[ids[0]].deleted_at
    with catalog.db.transaction() as session:
        session.execute(update(MediaItem).where(MediaItem.id == ids[0]).values(deleted_at=deleted_at - timedelta(days=40)))
    report = Tombstones(catalog.db, batch_size=10).compact(older_than=timedelta(days=30), actor="test")
    assert report.removed == 1
    assert variant_keys(catalog.db) == {"thumbs/1.webp"}
    plant_blob(media_root, "thumbs/0.webp", b"back")
    time.sleep(1.1)
    result = Reconciler(catalog.db, catalog.store).run(grace=timedelta(seconds=1), allow_mass_drift=True)
    assert (result.orphan_keys, result.orphans_deleted) == (["thumbs/0.webp"], 1)


@pytest.mark.parametrize("items, variants_each", [(50, 3), (1000, 2)])
def test_a_sweep_sends_one_delete_objects_request_per_thousand_keys_variants_included(
        pg_s3_catalog, objects, bucket, faults, items, variants_each):
    """A batch of N items with variants costs ceil(keys / 1000) DeleteObjects requests, not one per item."""
    catalog = pg_s3_catalog
    catalog.set_org("acme", "30d")
    writer = objects.writer(bucket)
    ids = seed_items(catalog.db, writer, "acme", items)
    seed_variants(catalog.db, writer, {media_id: [f"v/{media_id}/{n}" for n in range(variants_each)] for media_id in ids})
    sweeper = Sweeper(catalog.db, catalog.store, claim_lease=timedelta(minutes=5), batch_size=1000)
    counts = sweeper.sweep()
    assert (counts.deleted, counts.variants_deleted) == (items, items * variants_each)
    assert faults.sent["DeleteObjects"] == math.ceil(items * (1 + variants_each) / 1000)
    assert objects.names(bucket, f"{PREFIX}/") == set()


def test_a_manifest_line_registers_its_variants_and_a_variant_without_a_blob_is_a_bad_line(catalog, media_root, tmp_path):
    """`variants` in a manifest line adopts each key with the item (audited with the count); a variant key with no
    blob, or named twice in the file, is a bad line and nothing is imported."""
    catalog.set_org("acme", "30d")
    for key in ("media/m1.jpg", "thumbs/m1.webp", "media/m2.jpg"):
        plant_blob(media_root, key, b"x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"org": "acme", "id": "m1", "key": "media/m1.jpg", "variants": ["thumbs/none.webp"]}) + "\n"
                   + json.dumps({"org": "acme", "id": "m2", "key": "media/m2.jpg", "variants": ["media/m1.jpg"]}) + "\n")
    with pytest.raises(ManifestError) as refused:
        catalog.register_manifest(bad)
    assert [(error.line, error.message) for error in refused.value.errors] == [
        (1, "no blob at variant key 'thumbs/none.webp'"), (2, "duplicate key 'media/m1.jpg' (first on line 1)")]
    assert variant_keys(catalog.db) == set()

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"org": "acme", "id": "m1", "key": "media/m1.jpg", "variants": ["thumbs/m1.webp"]}) + "\n")
    assert catalog.register_manifest(good).to_dict()["imported"] == 1
    assert variant_keys(catalog.db, "m1") == {"thumbs/m1.webp"}
    assert catalog.audit.read(action="import").entries[0].details["variants"] == 1


@pytest.fixture
def versioned_catalog(request, raw_s3, bucket, database) -> Catalog:
    """A catalog on a bucket whose versioning is on before the store first looks at it."""
    raw_s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return request.getfixturevalue("s3_catalog")


def test_on_a_versioned_bucket_a_sweep_leaves_no_version_or_delete_marker_of_an_item_or_its_variants(
        versioned_catalog, raw_s3, bucket):
    """Versioning on: registration records each variant's version (a HEAD under the reservation), the sweep deletes
    exactly it, and a variant row recorded without a version (an older catalog) loses every version of its key;
    `ListObjectVersions` then shows nothing of the item, and verify is clean."""
    catalog = versioned_catalog
    catalog.set_org("acme", "30d")
    for key in ("media/a.jpg", "thumbs/a.webp"):
        raw_s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{key}", Body=b"bytes")
    created = database_time(catalog.db) - timedelta(hours=2)
    catalog.register(org="acme", key="media/a.jpg", media_id="a", ttl="1h", created_at=created, variants=["thumbs/a.webp"])
    current = raw_s3.head_object(Bucket=bucket, Key=f"{PREFIX}/thumbs/a.webp")["VersionId"]
    with catalog.db.transaction() as session:
        recorded = session.get(MediaVariant, "thumbs/a.webp").blob_version
    assert recorded == current
    for body in (b"old", b"new"):  # two versions of a legacy variant whose row records none
        raw_s3.put_object(Bucket=bucket, Key=f"{PREFIX}/thumbs/legacy.webp", Body=body)
    seed_variants(catalog.db, None, {"a": ["thumbs/legacy.webp"]})

    assert catalog.sweeper.sweep().variants_deleted == 2
    listing = raw_s3.list_object_versions(Bucket=bucket, Prefix=f"{PREFIX}/")
    left = [entry["Key"] for entry in (*listing.get("Versions", []), *listing.get("DeleteMarkers", []))]
    assert [key for key in left if ".media-retention" not in key] == []
    assert Verifier(catalog.db, catalog.store).run(grace=DAY, stuck_after=DAY).clean


def test_a_variant_under_object_lock_keeps_its_item_deleting_with_the_locks_date(
        raw_s3, bucket, s3_endpoint, tmp_path, database):
    """On an Object Lock bucket, a variant retained a few seconds more keeps its item `deleting` with the lock's
    reason and date (lookups answer 404) while the item's own blob is gone; once the date has passed a sweep deletes
    the variant's version and tombstones the item, nothing of either key left."""
    locked = f"{bucket}-lock"
    raw_s3.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    store = S3Store(locked, PREFIX, endpoint_url=s3_endpoint, delete_threads=4, throttle_backoff=0.01)
    try:
        engine = build(s3_settings_for(tmp_path, database, locked, s3_endpoint), database=database, store=store)
        engine.binding.ensure()
        catalog = engine.catalog
        catalog.set_org("acme", "30d")
        for key in ("media/a.jpg", "thumbs/a.webp"):
            raw_s3.put_object(Bucket=locked, Key=f"{PREFIX}/{key}", Body=b"bytes", ChecksumAlgorithm="CRC32")
        created = database_time(catalog.db) - timedelta(hours=2)
        catalog.register(org="acme", key="media/a.jpg", media_id="a", ttl="1h", created_at=created, variants=["thumbs/a.webp"])
        with catalog.db.transaction() as session:
            version = session.get(MediaVariant, "thumbs/a.webp").blob_version
        until = (datetime.now(timezone.utc) + timedelta(seconds=3)).replace(microsecond=0)
        raw_s3.put_object_retention(Bucket=locked, Key=f"{PREFIX}/thumbs/a.webp", VersionId=version, ChecksumAlgorithm="CRC32",
                                    Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until})

        first = catalog.sweeper.sweep()
        assert (first.deleted, first.failed, first.locked) == (0, 1, 1)
        row = rows_by_id(catalog, ["a"])["a"]
        assert (row.state, row.lock_reason, row.locked_until) == ("deleting", "retention", until)
        assert "variant thumbs/a.webp" in row.last_error
        with pytest.raises(Gone):
            catalog.lookup("a")
        time.sleep(max(0.0, (until - datetime.now(timezone.utc)).total_seconds()) + 1.5)
        end_leases(catalog.db)
        second = catalog.sweeper.sweep()
        assert (second.deleted, second.variants_deleted) == (1, 1)
        listing = raw_s3.list_object_versions(Bucket=locked, Prefix=f"{PREFIX}/")
        left = [entry["Key"] for entry in (*listing.get("Versions", []), *listing.get("DeleteMarkers", []))]
        assert [key for key in left if ".media-retention" not in key] == []
    finally:
        store.close()


def test_one_key_raced_by_a_variant_registration_a_variant_add_and_an_item_registration_has_one_owner(acme):
    """Three writers claim the same stored blob at the same instant (as another item's variant, as a variant added to
    an existing item, as an item's own key), ten rounds: the catalog's reservations let exactly one of them own the
    key, the others are refused with nothing registered, and the blob is never touched."""
    import threading

    catalog = acme.catalog
    register_with_variants(acme, "host", [], expired=False)
    for round_number in range(10):
        key = f"thumbs/raced-{round_number}.webp"
        acme.put(key, b"r" * 5)
        acme.put(f"media/as-variant-{round_number}.jpg", b"i")
        writers = {
            "variant of a new item": lambda: catalog.register(org="acme", key=f"media/as-variant-{round_number}.jpg",
                                                              media_id=f"as-variant-{round_number}", variants=[key]),
            "variant added": lambda: catalog.add_variants("host", [key]),
            "item": lambda: catalog.register(org="acme", key=key, media_id=f"as-item-{round_number}"),
        }
        barrier, won, refused, other = threading.Barrier(len(writers)), [], [], []

        def write(name, call):
            barrier.wait(timeout=10)
            try:
                call()
                won.append(name)
            except BadInput:
                refused.append(name)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                other.append((name, exc))

        threads = [threading.Thread(target=write, args=item) for item in writers.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not other, other
        assert len(won) == 1 and len(refused) == 2, (won, refused)
        as_item = rows_by_id(catalog, [f"as-item-{round_number}"])
        owners = (key in variant_keys(catalog.db)) + sum(row.storage_key == key for row in as_item.values())
        assert owners == 1, (round_number, won)
        assert key in acme.present(), "a writer that lost deleted the blob"
