"""Partial failures and request economy of S3 deletes, through the real sweep (PostgreSQL + moto server)."""

import json

import pytest
from botocore.stub import Stubber
from structlog.testing import capture_logs

from tests.factories import end_leases, rows_by_id, seed_items
from tests.s3 import PREFIX
from worker.store.keys import key_for_id


@pytest.fixture
def acme(pg_s3_catalog):
    pg_s3_catalog.set_org("acme", "30d")
    return "acme"


def deny_deletes(raw_s3, bucket, under: str) -> None:
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{bucket}/{PREFIX}/{under}*"}]}
    raw_s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def test_keys_the_store_refuses_keep_their_error_and_a_later_sweep_deletes_them(
    pg_s3_catalog, acme, objects, bucket, raw_s3, faults
):
    """A DeleteObjects answer with per-key AccessDenied errors: those items stay `deleting` with the
    error and a backoff; the rest are finalized once. After the fault clears, the next sweep deletes
    exactly the failed ones."""
    catalog = pg_s3_catalog
    good = {f"good-{n}": f"good/{n}" for n in range(30)}
    denied = {f"denied-{n}": f"denied/{n}" for n in range(10)}
    seed_items(catalog.db, objects.writer(bucket), acme, keys={**good, **denied})
    deny_deletes(raw_s3, bucket, "denied/")

    first = catalog.sweeper.sweep()
    assert (first.claimed, first.deleted, first.failed) == (40, 30, 10)
    assert faults.sent["DeleteObjects"] == 1  # a per-key AccessDenied is not retried in place
    failed_rows = rows_by_id(catalog, denied)
    assert {(row.state, row.attempts) for row in failed_rows.values()} == {("deleting", 1)}
    assert all("AccessDenied" in row.last_error for row in failed_rows.values())
    assert objects.names(bucket, f"{PREFIX}/") == {f"{PREFIX}/{key}" for key in denied.values()}
    finalized = {media_id: row.deleted_at for media_id, row in rows_by_id(catalog, good).items()}

    assert catalog.sweeper.sweep().claimed == 0  # still inside their backoff
    raw_s3.delete_bucket_policy(Bucket=bucket)
    end_leases(catalog.db)
    second = catalog.sweeper.sweep()
    assert (second.claimed, second.deleted, second.failed) == (10, 10, 0)
    assert objects.names(bucket, f"{PREFIX}/") == set()
    assert {media_id: row.deleted_at for media_id, row in rows_by_id(catalog, good).items()} == finalized


def test_a_slowdown_is_backed_off_and_the_same_sweep_deletes_everything(pg_s3_catalog, acme, objects, bucket, faults):
    """503 SlowDown past botocore's own 3 attempts: the store backs off and retries, logging
    store.s3.delete_retry, and the sweep still ends with every item deleted and none failed."""
    keys = {f"m-{n}": key_for_id(f"m-{n}") for n in range(20)}
    seed_items(pg_s3_catalog.db, objects.writer(bucket), acme, keys=keys)
    faults.plan["DeleteObjects"] = {1: "slowdown", 2: "slowdown", 3: "slowdown", 4: "slowdown"}
    with capture_logs() as logs:
        counts = pg_s3_catalog.sweeper.sweep()
    assert (counts.deleted, counts.failed) == (20, 0)
    assert faults.sent["DeleteObjects"] == 5
    retries = [entry for entry in logs if entry["event"] == "store.s3.delete_retry"]
    assert len(retries) == 1 and retries[0]["keys"] == 20 and "SlowDown" in retries[0]["error"]
    assert objects.names(bucket, f"{PREFIX}/") == set()


def test_a_slowdown_that_does_not_end_fails_the_keys_without_raising(make_store, objects, bucket):
    """When every round is throttled the keys come back failed (not an exception) after a bounded
    number of requests: botocore's 3 attempts for each of our rounds (here 1 + 1 retry, to keep
    botocore's own 1-2 s throttling sleeps short)."""
    from tests.s3 import Faults
    from worker.store import s3

    store = make_store(throttle_rounds=1)
    faults = Faults(store)
    faults.plan["DeleteObjects"] = {n: "slowdown" for n in range(1, 100)}
    objects.put(bucket, [f"{PREFIX}/a", f"{PREFIX}/b"])
    results = store.delete_many(["a", "b"])
    assert [r.ok for r in results] == [False, False]
    assert "SlowDown" in results[0].error
    assert faults.sent["DeleteObjects"] == s3.BOTOCORE_MAX_ATTEMPTS * 2
    assert objects.names(bucket) == {f"{PREFIX}/a", f"{PREFIX}/b"}


def test_a_connection_reset_fails_only_its_own_request_and_a_later_sweep_deletes_those_keys(
    pg_s3_catalog, acme, objects, bucket, faults
):
    """A reset that outlasts botocore's retries fails that request's 50 keys (no exception); the other
    batches are finalized once, and after the backoff the failed batch is deleted."""
    catalog = pg_s3_catalog
    keys = {f"r-{n:03d}": key_for_id(f"r-{n:03d}") for n in range(150)}
    seed_items(catalog.db, objects.writer(bucket), acme, keys=keys)
    # Every send of the batch holding r-075: its request and botocore's two retries.
    faults.poison["DeleteObjects"] = (keys["r-075"].encode(), "reset", 3)

    first = catalog.sweeper.sweep()
    assert (first.claimed, first.deleted, first.failed, first.batches) == (150, 100, 50, 3)
    rows = rows_by_id(catalog, keys)
    failed = {media_id for media_id, row in rows.items() if row.state == "deleting"}
    assert len(failed) == 50 and "r-075" in failed
    assert all("ConnectionClosedError" in rows[media_id].last_error for media_id in failed)
    finalized = {media_id: row.deleted_at for media_id, row in rows.items() if media_id not in failed}
    assert objects.names(bucket, f"{PREFIX}/") == {f"{PREFIX}/{keys[media_id]}" for media_id in failed}

    end_leases(catalog.db)
    second = catalog.sweeper.sweep()
    assert (second.claimed, second.deleted, second.failed) == (50, 50, 0)
    assert objects.names(bucket, f"{PREFIX}/") == set()
    after = rows_by_id(catalog, keys)
    assert {media_id: after[media_id].deleted_at for media_id in finalized} == finalized
    assert {row.state for row in after.values()} == {"deleted"}


def test_a_connection_reset_after_the_server_deleted_still_finalizes_the_keys(pg_s3_catalog, acme, objects, bucket, faults):
    """The server deletes, the answer is lost to a reset: botocore's retry finds the keys already gone
    (deleting twice is a success) and the sweep finalizes every item in one go."""
    keys = {f"x-{n}": key_for_id(f"x-{n}") for n in range(25)}
    seed_items(pg_s3_catalog.db, objects.writer(bucket), acme, keys=keys)
    faults.plan["DeleteObjects"] = {1: "reset_after"}
    counts = pg_s3_catalog.sweeper.sweep()
    assert (counts.deleted, counts.failed) == (25, 0)
    assert faults.sent["DeleteObjects"] == 2
    assert objects.names(bucket, f"{PREFIX}/") == set()


def test_deleting_10000_expired_items_sends_at_most_10_delete_objects_requests(
    tmp_path, pg_database, bucket, s3_endpoint, s3_store, objects, faults
):
    """With the default settings (1000 items a batch) a sweep of 10,000 expired items sends 10
    DeleteObjects requests, counted at the last hook before the wire, and leaves the prefix empty."""
    from config.settings import Settings
    from tests.s3 import s3_settings_for
    from worker.engine import build

    default_batch = Settings.model_fields["sweep_batch_size"].default
    settings = s3_settings_for(tmp_path, pg_database, bucket, s3_endpoint, sweep_batch_size=default_batch)
    catalog = build(settings, database=pg_database, store=s3_store).catalog
    catalog.set_org("acme", "30d")
    keys = {f"bulk-{n:05d}": key_for_id(f"bulk-{n:05d}") for n in range(10_000)}
    seed_items(catalog.db, objects.writer(bucket), "acme", keys=keys)

    counts = catalog.sweeper.sweep()
    assert (counts.claimed, counts.deleted, counts.failed) == (10_000, 10_000, 0)
    assert faults.sent["DeleteObjects"] <= 10, faults.sent
    assert faults.sent["DeleteObject"] == 0
    assert objects.names(bucket, f"{PREFIX}/") == set()


def test_per_key_slowdown_is_retried_alone_and_nosuchkey_counts_as_missing(s3_store):
    """In one DeleteObjects answer: Deleted is ok, NoSuchKey is ok+missing, SlowDown is retried by
    itself in a second request, AccessDenied fails. (Stubbed: no server returns these on demand.)"""
    names = [f"{PREFIX}/k{n}" for n in range(4)]
    assert s3_store.versioning() == "off"  # read from the server before the stub answers instead of it
    with Stubber(s3_store.client) as stub:
        stub.add_response(
            "delete_objects",
            {"Deleted": [{"Key": names[0]}], "Errors": [
                {"Key": names[1], "Code": "SlowDown", "Message": "Please reduce your request rate."},
                {"Key": names[2], "Code": "NoSuchKey", "Message": "The specified key does not exist."},
                {"Key": names[3], "Code": "AccessDenied", "Message": "Access Denied"}]},
            {"Bucket": s3_store.bucket, "Delete": {"Objects": [{"Key": name} for name in names], "Quiet": False}},
        )
        stub.add_response(
            "delete_objects",
            {"Deleted": [{"Key": names[1]}]},
            {"Bucket": s3_store.bucket, "Delete": {"Objects": [{"Key": names[1]}], "Quiet": False}},
        )
        results = s3_store.delete_many(["k0", "k1", "k2", "k3"])
        stub.assert_no_pending_responses()
    assert [(r.key, r.ok, r.missing) for r in results] == [("k0", True, False), ("k1", True, False), ("k2", True, True), ("k3", False, False)]
    assert results[3].error == "AccessDenied: Access Denied"


def test_a_key_the_answer_does_not_mention_is_never_counted_as_deleted(s3_store):
    """Only keys the store confirms are deleted succeed; silence about a key is a failure."""
    assert s3_store.versioning() == "off"  # read from the server before the stub answers instead of it
    with Stubber(s3_store.client) as stub:
        stub.add_response("delete_objects", {"Deleted": [{"Key": f"{PREFIX}/a"}]})
        results = s3_store.delete_many(["a", "b"])
    assert [r.ok for r in results] == [True, False]
    assert "did not mention" in results[1].error
