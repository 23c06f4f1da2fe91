"""The installed wheel on an S3-compatible store (moto's server on loopback): nothing boto3 needs is
missing from a plain `pip install .`."""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from tests.field.conftest import run

pytestmark = [pytest.mark.slow]


def test_register_presign_sweep_and_lookup_on_s3_from_the_installed_venv(installed, outside, s3_endpoint, bucket, raw_s3,
                                                                        tmp_path):
    """`register --file` uploads, `lookup --url` answers 404 for the expired item (which a hold placed afterwards
    cannot bring back: exit 3) and presigns a working GET for one held before its expiry, `sweep` deletes it with DeleteObjects once released, and `lookup` answers 404: on the
    embedded catalog, from the venv."""
    env = installed.env(data_dir=tmp_path / "data", storage_url=f"s3://{bucket}/media", s3_endpoint_url=s3_endpoint,
                        s3_addressing_style="path")

    def cli(*args: str):
        return run([installed.bin("media-retention"), *args, "--json"], env=env, cwd=outside)

    upload = tmp_path / "voice.ogg"
    upload.write_bytes(b"OggS field test")
    created = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cli("org", "set", "acme", "--retention", "30d").returncode == 0
    registered = cli("register", "--org", "acme", "--file", str(upload), "--id", "voice-1", "--ttl", "1h",
                     "--created-at", created)
    assert registered.returncode == 0, registered.stderr
    key = json.loads(registered.stdout)["key"]
    expired = cli("lookup", "voice-1", "--url")
    assert expired.returncode == 3 and json.loads(expired.stdout)["state"] == "expired"
    # Expired is final: a hold placed now cannot bring it back.
    assert cli("hold", "voice-1", "--reason", "field test").returncode == 3
    # Held before its expiry, media is served past it: the one way to presign an item past its expiry.
    soon = datetime.now(timezone.utc) - timedelta(hours=1) + timedelta(seconds=10)
    held = cli("register", "--org", "acme", "--file", str(upload), "--id", "voice-2", "--ttl", "1h",
               "--created-at", soon.isoformat())
    assert held.returncode == 0, held.stderr
    assert cli("hold", "voice-2", "--reason", "field test").returncode == 0
    while datetime.now(timezone.utc) <= soon + timedelta(hours=1, seconds=1):
        time.sleep(0.2)
    presigned = cli("lookup", "voice-2", "--url")
    assert presigned.returncode == 0, presigned.stderr
    assert urllib.request.urlopen(json.loads(presigned.stdout)["url"], timeout=10).read() == b"OggS field test"
    assert cli("release", "voice-2", "--reason", "field test done").returncode == 0

    swept = cli("sweep")
    assert swept.returncode == 0, swept.stderr
    assert json.loads(swept.stdout)["deleted"] == 2
    left = [entry["Key"] for entry in raw_s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert left == ["media/.media-retention.json"], f"{key} should be deleted and the store's binding marker kept: {left}"
    gone = cli("lookup", "voice-1")
    assert gone.returncode == 3 and json.loads(gone.stdout)["status"] == 404
