"""A real `media-retention sweep` process against moto's S3 server answering 500, 503 SlowDown and
per-key errors in DeleteObjects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.conftest import World, record
from tests.s3 import PREFIX

pytestmark = pytest.mark.slow

HOOK = Path(__file__).parent / "s3hook"


def test_a_sweep_process_rides_out_500_slowdown_and_per_key_errors(tmp_path, pg_database, s3_endpoint, bucket, objects, raw_s3):
    """500s and SlowDowns are retried (botocore, then the store's backoff) and the denied keys stay
    `deleting` with their error; once the policy is lifted a sweep after the backoff deletes them; no item
    is lost or deleted early and verify finds nothing."""
    world = World(tmp_path, pg_database, storage_url=f"s3://{bucket}/{PREFIX}", s3_endpoint_url=s3_endpoint,
                  s3_addressing_style="path", sweep_batch_size="50")
    world.exists = lambda key: f"{PREFIX}/{key}" in objects.names(bucket, f"{PREFIX}/{key}")
    world.seed("s3", expired=150, unexpired=60, held=30, blobs=objects.writer(bucket))
    # Per-key errors from the server itself: a bucket policy denying deletes under one sixteenth of the shards.
    denied_prefix = sorted(world.record.keys[m] for m in world.record.doomed)[0][:1]
    denied = {m for m in world.record.doomed if world.record.keys[m].startswith(denied_prefix)}
    raw_s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{bucket}/{PREFIX}/{denied_prefix}*"}]}))
    fault_log = tmp_path / "faults.log"
    # The first batch's request and its first retry answer 500, the second batch's first request SlowDown.
    plan = {"DeleteObjects": {"1": "500", "2": "500", "4": "slowdown"}}
    env = {"PYTHONPATH": f"{HOOK}:{world.env['PYTHONPATH']}", "MEDIA_RETENTION_TEST_S3_FAULTS": json.dumps(plan),
           "MEDIA_RETENTION_TEST_S3_FAULT_LOG": str(fault_log)}
    result = world.run("sweep", "--json", env=env)
    assert result.returncode == 1, result.stderr[-3000:]  # the denied keys failed
    counts = json.loads(result.stdout)
    assert (counts["failed"], counts["deleted"]) == (len(denied), len(world.record.doomed) - len(denied)), counts
    # By send number: two batches' requests may be on the wire at once and log in either order.
    injected = sorted(fault_log.read_text().splitlines(), key=lambda line: int(line.split()[1]))
    assert injected == ["DeleteObjects 1 500", "DeleteObjects 2 500", "DeleteObjects 4 slowdown"], injected
    assert world.run("sweep", "--json").returncode == 0  # inside the backoff: nothing claimed, nothing failed

    raw_s3.delete_bucket_policy(Bucket=bucket)
    world.end_leases()
    assert world.ok("sweep")["deleted"] == len(denied)
    lost, early = world.check_record()
    world.verify_clean()
    record("S3 500 / 503 SlowDown / per-key AccessDenied", "botocore before-send hook in the sweep process "
           "(sitecustomize); bucket policy on moto", len(injected) + len(denied), lost, early,
           f"3 request faults retried, {len(denied)} keys kept `deleting` then deleted; verify clean")
