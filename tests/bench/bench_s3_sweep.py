"""Sweep throughput on s3:// against a bare boto3 DeleteObjects loop, same moto server, same run.

    .venv/bin/pytest tests/bench/bench_s3_sweep.py -s --override-ini="addopts=-ra"

The sweep does everything the loop does plus the catalog work (claim and finalize on PostgreSQL); the
ratio says what that bookkeeping costs. Target (issue #11): the sweep reaches at least 0.95 of the loop's items/s.

moto runs in a child process here, as a real S3 endpoint is another machine: in this process its
request handling would compete with the sweeper for the GIL and measure Python's lock, not the sweep.
The child also seeds objects straight into its in-memory backend on request (PutObject over HTTP
would take minutes for 120,000 objects); only the deletes under test go over the wire.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time

import boto3
import pytest
from botocore.config import Config
from sqlalchemy import bindparam, update
from structlog.testing import capture_logs

from config.settings import Settings, load_settings
from tests.conftest import free_port
from tests.factories import seed_items, seed_variants
from tests.s3 import MOTO_ACCOUNT
from worker.engine import build
from worker.models import MediaItem, MediaVariant
from worker.store import MARKER_NAME
from worker.store.keys import key_for_id
from worker.store.s3 import MAX_DELETE_KEYS, S3Store

# 20,000 items = 20 full DeleteObjects requests a side: long enough (seconds) that timer noise and
# the first request's connection setup do not move the ratio.
ITEMS = 20_000
# Alternating rounds, the median of each side reported, so one hiccup of a shared machine does not
# decide the ratio.
ROUNDS = 5
TARGET_RATIO = 0.95
BUCKET = "bench"

pytestmark = pytest.mark.postgres


def _serve_moto(port: int, commands) -> None:
    """Child process: a moto S3 server on `port`, seeding objects into its backend when asked."""
    import logging

    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    commands.send("ready")
    while (command := commands.recv()) is not None:
        bucket, names = command
        backend = s3_backends[MOTO_ACCOUNT]["aws"]
        # The version each object got (moto's "null" on an unversioned bucket), for catalog rows to record.
        commands.send([backend.put_object(bucket, name, b"x" * 10).version_id for name in names])
    server.stop()


@pytest.fixture(scope="module")
def moto_process(monkeypatch_module):
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    port = free_port()
    child = context.Process(target=_serve_moto, args=(port, theirs), daemon=True)
    child.start()
    assert ours.recv() == "ready"

    def seed(names: list[str], bucket: str = BUCKET) -> list[str]:
        ours.send((bucket, names))
        versions = ours.recv()
        assert len(versions) == len(names)
        return versions

    yield f"http://127.0.0.1:{port}", seed
    ours.send(None)
    child.join(10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield env


def raw_loop(client, names: list[str]) -> float:
    started = time.perf_counter()
    for start in range(0, len(names), MAX_DELETE_KEYS):
        answer = client.delete_objects(
            Bucket=BUCKET, Delete={"Objects": [{"Key": name} for name in names[start : start + MAX_DELETE_KEYS]], "Quiet": False}
        )
        assert not answer.get("Errors")
    return time.perf_counter() - started


def test_sweep_on_s3_keeps_up_with_a_raw_delete_objects_loop(moto_process, pg_database, tmp_path):
    """Print items/s of a sweep of ITEMS expired items on s3:// and of a bare DeleteObjects loop, and their ratio."""
    endpoint, seed = moto_process
    # The loop's client is configured like the store's (retries, checksums) so only the sweep differs.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(
        retries={"mode": "standard", "total_max_attempts": 3}, request_checksum_calculation="when_required",
        response_checksum_validation="when_required", signature_version="s3v4"))
    client.create_bucket(Bucket=BUCKET)
    default_batch = Settings.model_fields["sweep_batch_size"].default
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url, storage_url=f"s3://{BUCKET}/media",
                             s3_endpoint_url=endpoint, sweep_batch_size=default_batch)
    store = S3Store.from_url(settings.storage_url, endpoint_url=endpoint)
    catalog = build(settings, database=pg_database, store=store).catalog
    catalog.set_org("bench", "30d")

    raw_rates, sweep_rates = [], []
    for round_number in range(ROUNDS):
        names = [f"raw/{key_for_id(f'r{round_number}-{n}')}" for n in range(ITEMS)]
        seed(names)
        raw_rates.append(ITEMS / raw_loop(client, names))

        keys = {f"s{round_number}-{n}": key_for_id(f"s{round_number}-{n}") for n in range(ITEMS)}
        seed([f"media/{key}" for key in keys.values()])
        seed_items(catalog.db, None, "bench", keys=keys)  # the blobs are in the child's backend already
        with capture_logs():  # 20 batch lines a round would bury the figures
            started = time.perf_counter()
            counts = catalog.sweeper.sweep()
            elapsed = time.perf_counter() - started
        assert (counts.deleted, counts.failed) == (ITEMS, 0)
        sweep_rates.append(ITEMS / elapsed)
        listed = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        assert [entry["Key"] for entry in listed] == [f"media/{MARKER_NAME}"]  # only the store's binding marker

    raw, sweep = statistics.median(raw_rates), statistics.median(sweep_rates)
    print(f"\nS3 sweep benchmark: {ITEMS:,} items x {ROUNDS} rounds, batch {default_batch}, moto (own process) on loopback, PostgreSQL")
    print(f"  raw DeleteObjects loop: {raw:,.0f} items/s  (rounds: {', '.join(f'{r:,.0f}' for r in raw_rates)})")
    print(f"  sweep on s3://        : {sweep:,.0f} items/s  (rounds: {', '.join(f'{r:,.0f}' for r in sweep_rates)})")
    print(f"  ratio sweep/raw       : {sweep / raw:.2f}  (target >= {TARGET_RATIO})")
    store.close()
    client.close()
    assert sweep / raw >= TARGET_RATIO


# Issue #21: a versioned bucket, every item with two derived files (variants), every blob's version recorded.
VERSIONED_BUCKET = "bench-versioned"
VARIANTS_PER_ITEM = 2
VERSIONED_ITEMS = 10_000  # 30,000 keys a round


def raw_version_loop(client, targets: list[tuple[str, str]]) -> float:
    started = time.perf_counter()
    for start in range(0, len(targets), MAX_DELETE_KEYS):
        answer = client.delete_objects(Bucket=VERSIONED_BUCKET, Delete={"Objects": [
            {"Key": key, "VersionId": version} for key, version in targets[start:start + MAX_DELETE_KEYS]], "Quiet": False})
        assert not answer.get("Errors")
    return time.perf_counter() - started


def _record_versions(db, model, key_column, versions: dict[str, str]) -> None:
    """Set blob_version of the rows whose storage key is known (what registration records from the PUT)."""
    with db.transaction() as session:
        session.connection().execute(
            update(model.__table__).where(key_column == bindparam("k")).values(blob_version=bindparam("v")),
            [{"k": key, "v": version} for key, version in versions.items()])


def test_sweep_of_items_with_variants_on_a_versioned_bucket_sends_one_delete_objects_per_thousand_keys(
        moto_process, pg_database, tmp_path):
    """Print keys/s of a sweep of items with two variants each on a versioned bucket (exact versions deleted)
    against a bare DeleteObjects loop of the same (key, version) pairs, and the requests per 1,000 keys:
    variants and versions must not cost the sweep extra requests (one DeleteObjects per 1,000 keys, no listing)."""
    endpoint, seed = moto_process
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(
        retries={"mode": "standard", "total_max_attempts": 3}, request_checksum_calculation="when_required",
        response_checksum_validation="when_required", signature_version="s3v4"))
    client.create_bucket(Bucket=VERSIONED_BUCKET)
    client.put_bucket_versioning(Bucket=VERSIONED_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url,
                             storage_url=f"s3://{VERSIONED_BUCKET}/media", s3_endpoint_url=endpoint)
    store = S3Store.from_url(settings.storage_url, endpoint_url=endpoint)
    calls: dict[str, int] = {}
    store.client.meta.events.register(
        "before-call.s3.*", lambda model, **_: calls.__setitem__(model.name, calls.get(model.name, 0) + 1))
    catalog = build(settings, database=pg_database, store=store).catalog
    catalog.set_org("bench", "30d")
    keys_per_round = VERSIONED_ITEMS * (1 + VARIANTS_PER_ITEM)
    with capture_logs():
        catalog.sweeper.sweep()  # once per process: binds the store and reads its versioning; not per key

    raw_rates, sweep_rates, requests = [], [], []
    for round_number in range(ROUNDS):
        names = [f"raw/{key_for_id(f'vr{round_number}-{n}')}" for n in range(keys_per_round)]
        raw_rates.append(keys_per_round / raw_version_loop(client, list(zip(names, seed(names, VERSIONED_BUCKET)))))

        keys = {f"v{round_number}-{n}": key_for_id(f"v{round_number}-{n}") for n in range(VERSIONED_ITEMS)}
        variants = {media_id: [f"{key}.v{number}" for number in range(VARIANTS_PER_ITEM)] for media_id, key in keys.items()}
        every_key = [*keys.values(), *(key for listed in variants.values() for key in listed)]
        versions = dict(zip(every_key, seed([f"media/{key}" for key in every_key], VERSIONED_BUCKET)))
        seed_items(catalog.db, None, "bench", keys=keys)
        seed_variants(catalog.db, None, variants)
        _record_versions(catalog.db, MediaItem, MediaItem.__table__.c.storage_key, {k: versions[k] for k in keys.values()})
        _record_versions(catalog.db, MediaVariant, MediaVariant.__table__.c.storage_key,
                         {k: versions[k] for listed in variants.values() for k in listed})
        calls.clear()
        with capture_logs():
            started = time.perf_counter()
            counts = catalog.sweeper.sweep()
            elapsed = time.perf_counter() - started
        assert (counts.deleted, counts.failed) == (VERSIONED_ITEMS, 0)
        sweep_rates.append(keys_per_round / elapsed)
        requests.append(dict(calls))
        left = client.list_object_versions(Bucket=VERSIONED_BUCKET)
        left = [entry["Key"] for entry in [*left.get("Versions", []), *left.get("DeleteMarkers", [])]
                if entry["Key"] != f"media/{MARKER_NAME}"]  # the store's binding marker stays, of course
        assert not left, f"versions or delete markers left: {left[:5]}"

    raw, sweep = statistics.median(raw_rates), statistics.median(sweep_rates)
    deletes = statistics.median(r.get("DeleteObjects", 0) for r in requests)
    print(f"\nS3 sweep, versioned bucket, {VERSIONED_ITEMS:,} items x {1 + VARIANTS_PER_ITEM} blobs "
          f"({keys_per_round:,} keys) x {ROUNDS} rounds, exact versions, moto (own process), PostgreSQL")
    print(f"  raw DeleteObjects loop of (key, version): {raw:,.0f} keys/s  (rounds: {', '.join(f'{r:,.0f}' for r in raw_rates)})")
    print(f"  sweep on s3://                          : {sweep:,.0f} keys/s  (rounds: {', '.join(f'{r:,.0f}' for r in sweep_rates)})")
    print(f"  ratio sweep/raw                         : {sweep / raw:.2f}")
    print(f"  store requests a sweep (median)         : {requests[len(requests) // 2]}")
    print(f"  DeleteObjects per 1,000 keys            : {deletes / keys_per_round * 1000:.2f}")
    store.close()
    client.close()
    assert all(r.get("DeleteObjects") == -(-keys_per_round // MAX_DELETE_KEYS) for r in requests), requests
    assert all(not r.get("ListObjectVersions") and not r.get("HeadObject") for r in requests), requests

