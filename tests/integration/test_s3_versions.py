"""Deleted means deleted on versioned and object-locked buckets (issue #21), against moto's S3 server.

A versioned bucket keeps every byte of a plainly deleted object as a noncurrent version behind a delete
marker; a bucket with Object Lock refuses to delete a locked version. These tests check, through the same
sweep, purge and reconcile an operator runs, that `ListObjectVersions` shows nothing of a deleted item, that a
locked version is reported with its date and goes once the date has passed, and that the request economy
of the sweep (one DeleteObjects per 1,000 keys) holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from structlog.testing import capture_logs

from config.errors import Gone
from tests.e2e.conftest import SCRIPT
from tests.factories import make_file, register_aged, rows_by_id, seed_items
from tests.s3 import PREFIX, Faults, s3_settings_for
from worker import status
from worker.db import db_now
from worker.engine import build
from worker.exporter import FleetStatusCollector
from worker.models import MediaItem
from worker.reconcile import Reconciler
from worker.store import MARKER_NAME
from worker.store.keys import key_for_id
from worker.store.s3 import S3Store
from worker.verify import Verifier


def everything_under(raw_s3, bucket: str, key: str) -> list[tuple[str, str]]:
    """Every version and delete marker of exactly `PREFIX/key`: what would still be billed or retrievable."""
    name = f"{PREFIX}/{key}"
    answer = raw_s3.list_object_versions(Bucket=bucket, Prefix=name)
    return [("version", entry["VersionId"]) for entry in answer.get("Versions", []) if entry["Key"] == name] + \
        [("marker", entry["VersionId"]) for entry in answer.get("DeleteMarkers", []) if entry["Key"] == name]


def verify(catalog):
    return Verifier(catalog.db, catalog.store).run(grace=timedelta(seconds=0), stuck_after=timedelta(days=1))


@pytest.fixture
def versioned(raw_s3, bucket) -> str:
    raw_s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


@pytest.fixture
def catalog(versioned, s3_catalog):
    """A catalog on a versioned bucket (versioning on before the store first looks)."""
    s3_catalog.set_org("acme", "30d")
    return s3_catalog


@pytest.fixture
def locked_bucket(raw_s3, bucket) -> str:
    name = f"{bucket}-lock"
    raw_s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def catalog_on(tmp_path, database, s3_endpoint):
    """Builds a catalog bound to a bucket of its own (org `acme`); its store is closed afterwards."""
    stores = []

    def on(bucket: str):
        stores.append(S3Store(bucket, PREFIX, endpoint_url=s3_endpoint, delete_threads=4, throttle_backoff=0.01))
        engine = build(s3_settings_for(tmp_path, database, bucket, s3_endpoint), database=database, store=stores[-1])
        engine.binding.ensure()
        engine.catalog.set_org("acme", "30d")
        return engine.catalog

    yield on
    for store in stores:
        store.close()


@pytest.fixture
def lock_catalog(catalog_on, locked_bucket):
    return catalog_on(locked_bucket)


def test_a_registered_file_records_its_version_and_the_sweep_leaves_no_version_and_no_marker(catalog, raw_s3, versioned, tmp_path):
    """The PUT's version is on the row; the sweep deletes exactly it, so nothing of the key is left. On the old code
    the row had no version and the sweep's DeleteObjects left the bytes behind a delete marker."""
    item = register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=tmp_path)
    [(kind, version)] = everything_under(raw_s3, versioned, item.key)
    assert kind == "version" and rows_by_id(catalog, [item.id])[item.id].blob_version == version
    assert catalog.sweeper.sweep().deleted == 1
    assert everything_under(raw_s3, versioned, item.key) == []
    assert verify(catalog).clean


def test_purge_and_a_legacy_row_with_three_versions_leave_nothing_of_their_keys(catalog, raw_s3, versioned, tmp_path):
    """A purged item goes with its version; a row from before versions were recorded (blob_version NULL) whose key
    holds three versions loses all three, and no delete marker is made."""
    purged = register_aged(catalog, "acme", timedelta(minutes=1), uploads=tmp_path, content=b"purge me")
    [legacy] = seed_items(catalog.db, None, "acme", 1, prefix="legacy")
    key = key_for_id(legacy)
    for body in (b"one", b"two", b"x" * 10):
        raw_s3.put_object(Bucket=versioned, Key=f"{PREFIX}/{key}", Body=body)
    assert rows_by_id(catalog, [legacy])[legacy].blob_version is None
    assert len(everything_under(raw_s3, versioned, key)) == 3
    assert catalog.purge(ids=[purged.id]).counts.deleted == 1
    assert catalog.sweeper.sweep().deleted == 1
    assert everything_under(raw_s3, versioned, purged.key) == [] and everything_under(raw_s3, versioned, key) == []
    assert verify(catalog).clean


def test_register_key_and_adopt_record_the_version_a_head_reports(catalog, raw_s3, versioned):
    """`register --key` and `adopt` take the version from the store's answer about the blob."""
    keyed = raw_s3.put_object(Bucket=versioned, Key=f"{PREFIX}/legacy/a.jpg", Body=b"abc")["VersionId"]
    adopted = raw_s3.put_object(Bucket=versioned, Key=f"{PREFIX}/legacy/b.jpg", Body=b"abcd")["VersionId"]
    item = catalog.register(org="acme", key="legacy/a.jpg", media_id="keyed")
    catalog.adopter().run(org="acme", grace=timedelta(0), actor="test")
    with catalog.db.transaction() as session:
        versions = dict(session.execute(select(MediaItem.storage_key, MediaItem.blob_version)).all())
    assert versions == {item.key: keyed, "legacy/b.jpg": adopted}


def test_reconcile_removes_every_version_of_an_orphan_and_of_a_tombstones_leftovers(catalog, raw_s3, versioned, tmp_path):
    """An orphan key with two versions and a delete marker, and a tombstone whose bytes the old code left behind a
    delete marker: verify calls the second a breach, reconcile removes every version of both, verify is clean."""
    orphan = f"{PREFIX}/orphans/o.bin"
    raw_s3.put_object(Bucket=versioned, Key=orphan, Body=b"v1")
    raw_s3.put_object(Bucket=versioned, Key=orphan, Body=b"v2")
    raw_s3.delete_object(Bucket=versioned, Key=orphan)
    item = register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=tmp_path)
    raw_s3.delete_object(Bucket=versioned, Key=f"{PREFIX}/{item.key}")  # what the old sweep did: a marker only
    with catalog.db.transaction() as session:
        session.execute(update(MediaItem).where(MediaItem.id == item.id)
                        .values(state="deleted", deleted_at=db_now(), claimed_at=db_now(), deletion_reason="ttl"))
    before = verify(catalog)
    assert before.breaches["tombstone_with_blob"] == 1 and before.examples["tombstone_with_blob"][0]["versions"] == 1
    report = Reconciler(catalog.db, catalog.store).run(grace=timedelta(0), allow_mass_drift=True)
    assert (report.orphans_deleted, report.leaks_deleted) == (1, 1)
    assert everything_under(raw_s3, versioned, "orphans/o.bin") == [] and everything_under(raw_s3, versioned, item.key) == []
    assert verify(catalog).clean


def test_the_sweep_sends_one_delete_objects_per_thousand_recorded_versions_and_lists_nothing(
        tmp_path, database, versioned, s3_endpoint, raw_s3, s3_store, objects):
    """1,200 expired items with recorded versions: two DeleteObjects requests (1,000 + 200 entries), no listing of
    versions, and nothing left in the bucket."""
    engine = build(s3_settings_for(tmp_path, database, versioned, s3_endpoint, sweep_batch_size=1000),
                   database=database, store=s3_store)
    engine.binding.ensure()
    engine.catalog.set_org("acme", "30d")
    ids = seed_items(engine.db, objects.writer(versioned), "acme", 1200)
    listed = {entry["Key"]: entry["VersionId"] for page in raw_s3.get_paginator("list_object_versions").paginate(Bucket=versioned)
              for entry in page.get("Versions", [])}
    with engine.db.transaction() as session:
        for media_id in ids:
            session.execute(update(MediaItem).where(MediaItem.id == media_id)
                            .values(blob_version=listed[f"{PREFIX}/{key_for_id(media_id)}"]))
    faults = Faults(s3_store)
    assert engine.catalog.sweeper.sweep().deleted == 1200
    assert faults.sent["DeleteObjects"] == 2 and faults.sent["ListObjectVersions"] == 0
    left = raw_s3.list_object_versions(Bucket=versioned, Prefix=f"{PREFIX}/", MaxKeys=1000)
    assert [entry["Key"] for entry in left.get("Versions", [])] == [f"{PREFIX}/{MARKER_NAME}"]  # the binding marker only
    assert left.get("DeleteMarkers") is None


def test_an_unversioned_bucket_costs_one_delete_objects_per_thousand_keys_and_nothing_else(
        tmp_path, database, bucket, s3_endpoint, s3_store, objects):
    """The unversioned path is unchanged: 1,200 items, two DeleteObjects, no listing of versions, no HEAD; the bucket's
    versioning is asked once for the whole run."""
    engine = build(s3_settings_for(tmp_path, database, bucket, s3_endpoint, sweep_batch_size=1000),
                   database=database, store=s3_store)
    engine.binding.ensure()
    engine.catalog.set_org("acme", "30d")
    seed_items(engine.db, objects.writer(bucket), "acme", 1200)
    faults = Faults(s3_store)
    assert engine.catalog.sweeper.sweep().deleted == 1200
    assert faults.sent["DeleteObjects"] == 2
    assert faults.sent["GetBucketVersioning"] <= 1
    assert faults.sent["ListObjectVersions"] == faults.sent["HeadObject"] == 0
    assert s3_store.describe() == {"versioning": "off", "object_lock": False}


def lock(raw_s3, bucket: str, key: str, version: str, *, until: datetime | None = None, legal_hold: bool = False) -> None:
    name = f"{PREFIX}/{key}"
    if until is not None:
        raw_s3.put_object_retention(Bucket=bucket, Key=name, VersionId=version, ChecksumAlgorithm="CRC32",
                                    Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until})
    if legal_hold:
        raw_s3.put_object_legal_hold(Bucket=bucket, Key=name, VersionId=version, ChecksumAlgorithm="CRC32",
                                     LegalHold={"Status": "ON"})


def test_a_locked_version_stays_deleting_with_its_date_is_reported_and_goes_once_the_date_has_passed(
        lock_catalog, raw_s3, locked_bucket, tmp_path):
    """Retention until a few seconds ahead and a legal hold: the sweep keeps both `deleting` (lookups answer 404) with
    reason and date, retries the retained one at its date, and status, verify and the metric show them; once the date
    has passed the next sweep deletes it and nothing of its key remains. On the old code both became tombstones
    while their versions stayed."""
    catalog = lock_catalog
    retained = register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=tmp_path, content=b"retained")
    held = register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=tmp_path, content=b"legal hold")
    rows = rows_by_id(catalog, [retained.id, held.id])
    until = (datetime.now(timezone.utc) + timedelta(seconds=4)).replace(microsecond=0)
    lock(raw_s3, locked_bucket, retained.key, rows[retained.id].blob_version, until=until)
    lock(raw_s3, locked_bucket, held.key, rows[held.id].blob_version, legal_hold=True)

    counts = catalog.sweeper.sweep()
    assert (counts.deleted, counts.failed, counts.locked) == (0, 2, 2)
    rows = rows_by_id(catalog, [retained.id, held.id])
    assert {media_id: (row.state, row.lock_reason) for media_id, row in rows.items()} == {
        retained.id: ("deleting", "retention"), held.id: ("deleting", "legal_hold")}
    assert rows[retained.id].locked_until == until and rows[held.id].locked_until is None
    # Retried at the retain-until date (within a second), the legal hold at the capped backoff (an hour).
    assert abs((rows[retained.id].lease_until - until).total_seconds()) <= 2
    assert rows[held.id].lease_until - rows[held.id].claimed_at >= timedelta(minutes=59)
    with pytest.raises(Gone):
        catalog.lookup(retained.id)
    numbers = status.fleet_status(catalog.db)
    assert numbers["locked_deletions"]["count"] == 2
    assert numbers["locked_deletions"]["by_reason"] == {"retention": 1, "legal_hold": 1}
    assert numbers["locked_deletions"]["earliest_until"] == until.isoformat()
    assert numbers["stuck"]["count"] == 0  # waiting for a lock is not stuck
    report = verify(catalog)
    assert report.clean and report.notices["locked"] == 2
    assert {example["reason"] for example in report.locked_examples} == {"retention", "legal_hold"}
    gauges = {family.name: family for family in FleetStatusCollector(catalog.db).collect()}
    assert {sample.labels["reason"]: sample.value for sample in gauges["media_retention_locked_deletions"].samples} == {
        "retention": 1.0, "legal_hold": 1.0}

    time.sleep(max((until - datetime.now(timezone.utc)).total_seconds() + 1.5, 0))
    counts = catalog.sweeper.sweep()
    assert (counts.deleted, counts.locked) == (1, 0)
    rows = rows_by_id(catalog, [retained.id, held.id])
    assert (rows[retained.id].state, rows[retained.id].lock_reason, rows[retained.id].locked_until) == ("deleted", None, None)
    assert everything_under(raw_s3, locked_bucket, retained.key) == []
    assert rows[held.id].state == "deleting"  # its lease (the hold's backoff) has not run out
    assert status.fleet_status(catalog.db)["locked_deletions"]["by_reason"] == {"retention": 0, "legal_hold": 1}


def test_registering_media_that_expires_before_the_buckets_default_retention_warns(catalog_on, raw_s3, locked_bucket, tmp_path):
    """A bucket locking every new version for 2 days and an item with a 1-hour TTL: registered, with a warning event
    naming the item; uploads to the locked bucket carry the checksum S3 requires there."""
    raw_s3.put_object_lock_configuration(Bucket=locked_bucket, ChecksumAlgorithm="CRC32", ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2}}})
    lock_catalog = catalog_on(locked_bucket)
    with capture_logs() as events:
        item = lock_catalog.register(org="acme", file=make_file(tmp_path, b"short-lived"), ttl="1h", media_id="short")
        kept = lock_catalog.register(org="acme", file=make_file(tmp_path, b"long-lived"), ttl="30d", media_id="long")
    warnings = [event for event in events if event["event"] == "register.expires_before_default_retention"]
    assert [(event["example"], event["items"], event["default_retention_days"]) for event in warnings] == [(item.id, 1, 2)]
    assert kept.id == "long"


def test_status_and_volume_say_how_the_bucket_deletes_and_register_warns_on_stderr_as_typed(raw_s3, bucket, s3_endpoint, tmp_path):
    """`media-retention` as an operator types it, on a bucket with Object Lock and a 2-day default retention:
    `register` of a 1-hour item succeeds and says on stderr that the bytes outlive it; `status` and `volume` name
    the bucket's versioning and lock; `status` lists the item the lock keeps once a sweep met the lock."""
    name = f"{bucket}-cli"
    raw_s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    raw_s3.put_object_lock_configuration(Bucket=name, ChecksumAlgorithm="CRC32", ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2}}})
    env = {**os.environ, "MEDIA_RETENTION_DATA_DIR": str(tmp_path / "data"), "MEDIA_RETENTION_STORAGE_URL": f"s3://{name}/{PREFIX}",
           "MEDIA_RETENTION_S3_ENDPOINT_URL": s3_endpoint, "MEDIA_RETENTION_LOG_FORMAT": "json"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)

    upload = make_file(tmp_path, b"short-lived media")
    assert run("db", "upgrade").returncode == 0 and run("org", "set", "acme", "--retention", "30d").returncode == 0
    created = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    registered = run("register", "--org", "acme", "--file", str(upload), "--id", "img-1", "--ttl", "1h", "--created-at", created)
    assert registered.returncode == 0
    [warning] = [json.loads(line) for line in registered.stderr.splitlines() if "expires_before_default_retention" in line]
    assert (warning["level"], warning["example"], warning["default_retention_days"]) == ("warning", "img-1", 2)
    assert run("sweep").returncode == 1  # the lock refuses the delete: a failure, kept and retried
    shown = run("status", "--json")
    numbers = json.loads(shown.stdout)
    assert numbers["store"] == {"versioning": "Enabled", "object_lock": True}
    assert numbers["locked_deletions"]["count"] == 1 and numbers["locked_deletions"]["items"][0]["id"] == "img-1"
    assert numbers["locked_deletions"]["items"][0]["reason"] == "retention"
    text = run("status").stdout
    assert "store:          versioning Enabled, object lock on" in text and "img-1" in text
    assert json.loads(run("volume", "--json").stdout)["store"] == {"versioning": "Enabled", "object_lock": True}
    assert run("lookup", "img-1").returncode == 3


def test_a_manifests_file_and_key_lines_record_their_versions(catalog, raw_s3, versioned, tmp_path):
    """`register --manifest`: a `file` line records the version its upload created, a `key` line the version its HEAD
    reports; a key whose latest entry is a delete marker is not counted by `adopt --dry-run` (it reads as missing)."""
    existing = raw_s3.put_object(Bucket=versioned, Key=f"{PREFIX}/legacy/k.jpg", Body=b"keyed")["VersionId"]
    raw_s3.put_object(Bucket=versioned, Key=f"{PREFIX}/legacy/gone.jpg", Body=b"gone")
    raw_s3.delete_object(Bucket=versioned, Key=f"{PREFIX}/legacy/gone.jpg")
    make_file(tmp_path, b"from a file").rename(tmp_path / "f.bin")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"org": "acme", "id": "from-file", "file": "f.bin"}) + "\n"
                        + json.dumps({"org": "acme", "id": "from-key", "key": "legacy/k.jpg"}) + "\n")
    catalog.register_manifest(manifest)
    rows = rows_by_id(catalog, ["from-file", "from-key"])
    uploaded = everything_under(raw_s3, versioned, rows["from-file"].storage_key)
    assert rows["from-file"].blob_version == uploaded[0][1] and rows["from-key"].blob_version == existing
    assert catalog.adopter().run(org="acme", grace=timedelta(0), actor="test", dry_run=True).adopted == 0


def test_a_bucket_whose_versioning_cannot_be_read_is_handled_as_versioned(versioned, raw_s3, make_store):
    """GetBucketVersioning throttled past botocore's retries: the store says "unknown" and deletes a key without a
    recorded version as on a versioned bucket, every version of it, never leaving bytes behind a delete marker."""
    for body in (b"old", b"new"):
        raw_s3.put_object(Bucket=versioned, Key=f"{PREFIX}/a/b", Body=body)
    store = make_store()
    faults = Faults(store)
    faults.plan["GetBucketVersioning"] = {1: "slowdown", 2: "slowdown", 3: "slowdown"}
    [result] = store.delete_many(["a/b"])
    assert result.ok and store.versioning() == "unknown"
    assert everything_under(raw_s3, versioned, "a/b") == []
    assert faults.sent["GetBucketVersioning"] == 3  # asked once (three attempts), then trusted for five minutes
