"""The DESIGN contract on `s3://bucket/media`, against a real S3 protocol server on loopback: the engine
(register, sweep, lookup, holds, purge, reconcile) on S3, and what only the S3 store has (the prefix,
request economy, conditional writes, multipart, pagination, delete modes, presigned URLs). What every
store promises is in the store contract, tests/integration/test_store_contract.py, run on S3 too."""

from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import pytest
import urllib3
from sqlalchemy import update

from config.settings import load_settings
from tests.factories import expiring_in, register_aged, seed_items, states, wait_past
from tests.s3 import PREFIX
from worker.db import db_now
from config.errors import BadInput, Gone, NotFound
from worker.models import MediaItem
from worker.responses import not_found_body
from worker.store.keys import key_for_id


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "uploads"


@pytest.fixture
def acme(s3_catalog):
    s3_catalog.set_org("acme", "30d")
    return "acme"


def object_body(raw_s3, bucket, name):
    return raw_s3.get_object(Bucket=bucket, Key=name)["Body"].read()


def test_register_file_uploads_the_blob_under_the_prefix(s3_catalog, acme, uploads, raw_s3, bucket):
    """register --file puts the bytes at media/<key> and records the size the store holds."""
    item = register_aged(s3_catalog, acme, timedelta(0), uploads=uploads, content=b"jpeg bytes")
    assert item.size == 10
    assert object_body(raw_s3, bucket, f"{PREFIX}/{item.key}") == b"jpeg bytes"


def test_register_key_adopts_an_existing_object_with_its_size_from_the_store(s3_catalog, acme, objects, bucket):
    """register --key takes the size from HeadObject; a key with no object is bad input."""
    objects.put(bucket, [f"{PREFIX}/legacy/a.jpg"], b"y" * 1234)
    item = s3_catalog.register(org=acme, key="legacy/a.jpg", media_id="legacy-a")
    assert (item.size, item.mime) == (1234, "image/jpeg")
    with pytest.raises(BadInput, match="no blob at storage key"):
        s3_catalog.register(org=acme, key="legacy/missing.jpg")


def test_a_sweep_deletes_expired_objects_and_keeps_unexpired_ones(s3_catalog, acme, uploads, objects, bucket):
    """Expired items lose their object and become tombstones; younger items and their objects stay."""
    old = register_aged(s3_catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    young = register_aged(s3_catalog, acme, timedelta(minutes=59), ttl="1h", uploads=uploads)
    counts = s3_catalog.sweeper.sweep()
    assert (counts.claimed, counts.deleted, counts.failed, counts.bytes_freed) == (1, 1, 0, old.size)
    assert objects.names(bucket, f"{PREFIX}/") == {f"{PREFIX}/{young.key}"}
    assert states(s3_catalog, [old.id, young.id]) == {old.id: "deleted", young.id: "active"}


def test_lookup_answers_gone_after_the_sweep_and_not_found_for_unknown_ids(s3_catalog, acme, uploads):
    """lookup: the item while active, a 404 'gone' body with reason once swept, NotFound if never seen."""
    item = register_aged(s3_catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    s3_catalog.sweeper.sweep()
    with pytest.raises(Gone) as gone:
        s3_catalog.lookup(item.id)
    assert {k: not_found_body(item.id, gone.value.tombstone)[k] for k in ("status", "error", "reason")} == {"status": 404, "error": "gone", "reason": "ttl"}
    with pytest.raises(NotFound):
        s3_catalog.lookup("never-seen")


def test_held_items_and_held_orgs_survive_sweeps_and_purges(s3_catalog, acme, uploads, objects, bucket):
    """An item hold and an org hold placed before the expiry keep the objects through a sweep and a purge past it
    until released."""
    s3_catalog.set_org("frozen", "30d")
    held = expiring_in(s3_catalog, acme, 3, uploads=uploads)
    in_held_org = expiring_in(s3_catalog, "frozen", 3, uploads=uploads)
    s3_catalog.set_hold(held=True, reason="litigation", ids=[held.id])
    s3_catalog.set_hold(held=True, reason="audit", org="frozen")
    wait_past(s3_catalog, held, in_held_org)
    s3_catalog.sweeper.sweep()
    s3_catalog.purge(ids=[held.id])
    with pytest.raises(BadInput):
        s3_catalog.purge(org="frozen")
    assert objects.names(bucket, f"{PREFIX}/") == {f"{PREFIX}/{held.key}", f"{PREFIX}/{in_held_org.key}"}
    s3_catalog.set_hold(held=False, reason="settled", ids=[held.id])
    s3_catalog.set_hold(held=False, reason="done", org="frozen")
    assert s3_catalog.sweeper.sweep().deleted == 2
    assert objects.names(bucket, f"{PREFIX}/") == set()


def test_purge_deletes_unexpired_objects_now(s3_catalog, acme, uploads, objects, bucket):
    """A purge by ID and by org removes objects regardless of expiry, with reasons purge and org_purge."""
    one = register_aged(s3_catalog, acme, timedelta(0), uploads=uploads)
    rest = [register_aged(s3_catalog, acme, timedelta(0), uploads=uploads) for _ in range(3)]
    assert s3_catalog.purge(ids=[one.id]).counts.deleted == 1
    assert s3_catalog.purge(org=acme).counts.deleted == 3
    assert objects.names(bucket, f"{PREFIX}/") == set()
    reasons = set()
    for item in [one, *rest]:
        with pytest.raises(Gone) as gone:
            s3_catalog.lookup(item.id)
        reasons.add(gone.value.tombstone.reason)
    assert reasons == {"purge", "org_purge"}


def test_objects_outside_the_prefix_and_in_other_buckets_survive_sweep_purge_and_listing(
    s3_catalog, acme, objects, bucket, raw_s3
):
    """Same-named objects beside the prefix (media-old/, root, other/) and in another bucket are never
    deleted or listed, even though items with those very keys are swept and purged."""
    keys = {f"item-{n}": key_for_id(f"item-{n}") for n in range(4)}
    seed_items(s3_catalog.db, objects.writer(bucket), acme, keys=dict(list(keys.items())[:2]), expired=True)
    seed_items(s3_catalog.db, objects.writer(bucket), acme, keys=dict(list(keys.items())[2:]), expired=False)
    bystanders = {f"{where}{key}" for key in keys.values() for where in ("", "media-old/", "other/media/", f"{PREFIX}x/")}
    objects.put(bucket, sorted(bystanders))
    other_bucket = f"{bucket}-other"
    raw_s3.create_bucket(Bucket=other_bucket)
    objects.put(other_bucket, [f"{PREFIX}/{key}" for key in keys.values()])

    assert sorted(info.key for info in s3_catalog.store.iter_keys()) == sorted(keys.values())
    assert s3_catalog.sweeper.sweep().deleted == 2
    assert s3_catalog.purge(org=acme).counts.deleted == 2
    assert objects.names(bucket) == bystanders
    assert objects.names(other_bucket) == {f"{PREFIX}/{key}" for key in keys.values()}


def test_reconcile_deletes_old_orphans_under_the_prefix_only_and_tombstones_missing_objects(
    s3_catalog, acme, objects, bucket, raw_s3
):
    """Reconcile on s3://: an old unregistered object under the prefix goes, a young one stays, the same
    names outside the prefix and in another bucket stay; an item whose object vanished is recorded at
    the first run and becomes a missing_blob tombstone once it has been missing for the grace."""
    from worker.reconcile import Reconciler

    seed_items(s3_catalog.db, objects.writer(bucket), acme, keys={"live": "live/1"}, expired=False)
    seed_items(s3_catalog.db, None, acme, keys={"lost": "lost/1"}, expired=False)
    objects.put(bucket, [f"{PREFIX}/stray/old", "stray/old", "media-old/stray/old"], age=timedelta(days=2))
    objects.put(bucket, [f"{PREFIX}/stray/young"])
    other_bucket = f"{bucket}-other"
    raw_s3.create_bucket(Bucket=other_bucket)
    objects.put(other_bucket, [f"{PREFIX}/stray/old"], age=timedelta(days=2))

    reconciler = Reconciler(s3_catalog.db, s3_catalog.store)
    report = reconciler.run(grace=timedelta(days=1))
    assert (report.orphans_deleted, report.young_blobs_skipped, report.missing_first_seen, report.marked_missing) == (1, 1, 1, 0)
    assert objects.names(bucket) == {f"{PREFIX}/live/1", f"{PREFIX}/stray/young", "stray/old", "media-old/stray/old"}
    assert objects.names(other_bucket) == {f"{PREFIX}/stray/old"}
    assert s3_catalog.lookup("lost").state == "active"
    table = MediaItem.__table__
    with s3_catalog.db.transaction() as session:
        session.execute(update(table).where(table.c.id == "lost").values(missing_since=db_now(-2 * 86400)))
    assert reconciler.run(grace=timedelta(days=1)).marked_missing == 1
    with pytest.raises(Gone) as gone:
        s3_catalog.lookup("lost")
    assert gone.value.tombstone.reason == "missing_blob"


def test_reconcile_aborts_unfinished_multipart_uploads_under_the_prefix_only(s3_catalog, acme, raw_s3, bucket):
    """A killed upload leaves a multipart upload whose parts S3 keeps (and bills) forever: reconcile
    aborts it once it is older than the grace; one beside the prefix is not ours and stays."""
    from worker.reconcile import Reconciler
    from worker.verify import Verifier

    ours = raw_s3.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/ab/cd/big.mp4")["UploadId"]
    raw_s3.upload_part(Bucket=bucket, Key=f"{PREFIX}/ab/cd/big.mp4", UploadId=ours, PartNumber=1, Body=b"x" * 1024)
    theirs = raw_s3.create_multipart_upload(Bucket=bucket, Key="other/big.mp4")["UploadId"]
    # moto reports every upload as initiated in 2010: old enough for any grace.
    assert Verifier(s3_catalog.db, s3_catalog.store).run(grace=timedelta(days=1), stuck_after=timedelta(days=1)).breaches["abandoned_upload"] == 1
    report = Reconciler(s3_catalog.db, s3_catalog.store).run(grace=timedelta(days=1))
    assert (report.partial_uploads, report.partial_uploads_discarded) == (1, 1)
    assert [upload["UploadId"] for upload in raw_s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [theirs]


def test_refused_keys_cost_no_request_and_the_valid_key_beside_them_goes_in_one(s3_store, objects, bucket, faults):
    """`..`, absolute, empty-step, NUL and control-character keys are refused before anything is sent, so one
    DeleteObjects carries the valid key alone; a refused key cannot be presigned either. (That every store
    refuses such keys for every operation is the store contract's.)"""
    objects.put(bucket, ["secret", f"{PREFIX}/ok/1"])
    bad = ["../secret", "/secret", "ok/../../secret", "ok//1", "a\x00b", "a\nb", "."]
    results = s3_store.delete_many([*bad, "ok/1"])
    assert [r.ok for r in results] == [False] * len(bad) + [True]
    assert all(r.error.startswith("refused") for r in results[:-1])
    assert objects.names(bucket) == {"secret"}
    assert faults.sent["DeleteObjects"] == 1
    with pytest.raises(BadInput):
        s3_store.presigned_url("../secret", 60)


def test_a_writer_that_gets_in_after_the_check_is_stopped_by_the_conditional_write(s3_store, objects, bucket, tmp_path, raw_s3):
    """When a concurrent writer creates the object between our HEAD check and the upload, the server's
    conditional write (If-None-Match) still refuses to replace it. (The HEAD check's own refusal is the
    store contract's `test_a_blob_is_never_overwritten`.)"""
    objects.put(bucket, [f"{PREFIX}/taken"], b"original")
    upload = tmp_path / "new.bin"
    upload.write_bytes(b"replacement")
    s3_store.stat = lambda key: None  # the object appears after our check: only If-None-Match stands
    with pytest.raises(BadInput, match="refusing to overwrite"):
        s3_store.put_file("taken", upload)
    assert object_body(raw_s3, bucket, f"{PREFIX}/taken") == b"original"


def test_a_large_file_is_uploaded_in_parts_and_still_create_only(make_store, tmp_path, raw_s3, bucket):
    """Above the multipart threshold the upload goes in parts; the completed object has every byte."""
    from tests.s3 import Faults

    store = make_store(multipart_bytes=5 * 1024 * 1024)  # S3's smallest part size
    sent = Faults(store).sent
    payload = bytes(range(256)) * (6 * 1024 * 1024 // 256 + 7)
    upload = tmp_path / "video.mp4"
    upload.write_bytes(payload)
    assert store.put_file("big/video.mp4", upload) == len(payload)
    assert (sent["CreateMultipartUpload"], sent["UploadPart"], sent["CompleteMultipartUpload"]) == (1, 2, 1)
    assert object_body(raw_s3, bucket, f"{PREFIX}/big/video.mp4") == payload
    with pytest.raises(BadInput, match="refusing to overwrite"):
        store.put_file("big/video.mp4", upload)


def test_listing_is_paginated_and_yields_keys_relative_to_the_prefix(s3_store, objects, bucket):
    """iter_keys pages through ListObjectsV2 (1000 a page) and skips directory markers it cannot address."""
    names = [f"{PREFIX}/k/{n:04d}" for n in range(2500)]
    objects.put(bucket, [*names, f"{PREFIX}/dir/", "outside/k/0001"])
    listed = list(s3_store.iter_keys())
    assert [info.key for info in listed] == [name.removeprefix(f"{PREFIX}/") for name in names]
    assert {info.size for info in listed} == {10}
    assert all(info.modified.tzinfo is not None for info in listed)


def test_a_store_without_prefix_uses_the_whole_bucket(make_store, objects, bucket):
    """s3://bucket (no prefix) addresses keys at the bucket root."""
    store = make_store(prefix="")
    objects.put(bucket, ["a/b"])
    assert store.stat("a/b").size == 10 and store.delete_many(["a/b"])[0].ok
    assert objects.names(bucket) == set()


def test_single_mode_deletes_with_one_request_per_key(make_store, objects, bucket):
    """delete_mode=single (GCS XML API) sends concurrent DeleteObject calls and never DeleteObjects."""
    from tests.s3 import Faults

    store = make_store(delete_mode="single")
    sent = Faults(store).sent
    names = [f"k/{n}" for n in range(20)]
    objects.put(bucket, [f"{PREFIX}/{name}" for name in names])
    results = store.delete_many(names)
    assert all(r.ok for r in results) and [r.key for r in results] == names
    assert (sent["DeleteObject"], sent["DeleteObjects"]) == (20, 0)
    assert objects.names(bucket) == set()


def test_lookup_url_is_a_presigned_get_that_downloads_the_blob_and_none_once_gone(s3_catalog, acme, uploads):
    """Catalog.presigned_url: a working GET URL valid presign_ttl (1h) for an active item; Gone after a purge."""
    item = register_aged(s3_catalog, acme, timedelta(0), uploads=uploads, content=b"voice note")
    answer = s3_catalog.presigned_url(item.id)
    assert answer.expires_in == 3600
    assert parse_qs(urlparse(answer.url).query)["X-Amz-Expires"] == ["3600"]
    response = urllib3.request("GET", answer.url)
    assert (response.status, response.data) == (200, b"voice note")
    s3_catalog.purge(ids=[item.id])
    with pytest.raises(Gone):
        s3_catalog.presigned_url(item.id)
    with pytest.raises(NotFound):
        s3_catalog.presigned_url("never-seen")


def test_a_presigned_url_for_an_item_expiring_in_ten_minutes_ends_at_its_expiry_not_an_hour_later(s3_catalog, acme, uploads):
    """An item with ten minutes left (database clock) gets a URL valid those ten minutes, whole seconds, floored."""
    item = register_aged(s3_catalog, acme, timedelta(minutes=50), ttl="1h", uploads=uploads)
    answer = s3_catalog.presigned_url(item.id)
    assert 590 < answer.expires_in <= 600
    assert parse_qs(urlparse(answer.url).query)["X-Amz-Expires"] == [str(answer.expires_in)]
    assert item.expires_at - timedelta(seconds=1) < answer.expires_at <= item.expires_at


def test_an_item_with_less_than_a_second_left_answers_gone_instead_of_a_url(s3_catalog, acme, uploads):
    """Half a second before its expiry an item gets no URL: Gone (expired, ttl), like an item already past it."""
    item = register_aged(s3_catalog, acme, timedelta(hours=1, seconds=-0.5), ttl="1h", uploads=uploads)
    with pytest.raises(Gone) as gone:
        s3_catalog.presigned_url(item.id)
    assert (gone.value.tombstone.state, gone.value.tombstone.reason) == ("expired", "ttl")
    assert gone.value.tombstone.deleted_at == item.expires_at


def test_a_held_item_past_its_expiry_gets_a_url_for_the_full_presign_ttl_and_none_once_released(s3_catalog, acme, uploads):
    """Held media has no end yet: held before its expiry and then past it, its URL lives presign_ttl (1h);
    released, the expired item answers Gone."""
    item = expiring_in(s3_catalog, acme, 3, uploads=uploads)
    s3_catalog.set_hold(held=True, reason="litigation", ids=[item.id])
    wait_past(s3_catalog, item)
    answer = s3_catalog.presigned_url(item.id)
    assert answer.expires_in == 3600 and parse_qs(urlparse(answer.url).query)["X-Amz-Expires"] == ["3600"]
    s3_catalog.set_hold(held=False, reason="case closed", ids=[item.id])
    with pytest.raises(Gone) as gone:
        s3_catalog.presigned_url(item.id)
    assert gone.value.tombstone.state == "expired"


def test_lookup_url_on_a_filesystem_store_is_bad_input(catalog):
    """A filesystem store cannot presign: BadInput (exit 2), whatever the ID."""
    with pytest.raises(BadInput, match="object store") as error:
        catalog.presigned_url("any-id")
    assert error.value.exit_code == 2


def test_presign_ttl_longer_than_an_hour_is_rejected():
    """MEDIA_RETENTION_PRESIGN_TTL accepts up to 1h; 2h is bad input naming the variable."""
    assert load_settings(presign_ttl="15m").presign_ttl == timedelta(minutes=15)
    with pytest.raises(BadInput, match="MEDIA_RETENTION_PRESIGN_TTL"):
        load_settings(presign_ttl="2h")


def test_storage_urls_with_a_bad_bucket_or_prefix_are_bad_input(s3_endpoint):
    """from_url refuses an invalid bucket, an escaping prefix and credentials in the URL."""
    from worker.store import open_store

    for url in ("s3://", "s3://a", "s3://Bad Bucket/x", "s3://bucket/../x", "s3://key:secret@bucket/x"):
        with pytest.raises(BadInput):
            open_store(url, endpoint_url=s3_endpoint)


def test_an_object_store_has_no_usage_of_its_own(s3_store):
    """usage() is None for S3: the volume check measures live media in the catalog against the configured capacity."""
    assert s3_store.usage() is None

