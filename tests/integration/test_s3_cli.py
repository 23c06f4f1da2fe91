"""`media-retention` on an s3:// store: register --file/--key and lookup --url, as an operator runs them."""


from datetime import datetime, timedelta

import pytest
import urllib3

from config.settings import get_settings
from tests.factories import database_time
from tests.s3 import PREFIX


@pytest.fixture
def on_s3(data_dir, monkeypatch, bucket, s3_endpoint):
    monkeypatch.setenv("MEDIA_RETENTION_STORAGE_URL", f"s3://{bucket}/{PREFIX}")
    monkeypatch.setenv("MEDIA_RETENTION_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MEDIA_RETENTION_PRESIGN_TTL", "15m")
    get_settings.cache_clear()
    return bucket


def test_lookup_url_prints_a_working_presigned_url_then_404_bodies_like_lookup(cli, on_s3, tmp_path):
    """lookup --url: exit 0 and a GET URL valid 15m while active; exit 3 with the gone / not_found body after."""
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(b"\xff\xd8 photo")
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    assert cli("register", "--org", "acme", "--file", str(upload), "--id", "img-1", "--json").code == 0
    active = cli("lookup", "img-1", "--url", "--json")
    assert (active.code, active.json["id"], active.json["expires_in"]) == (0, "img-1", 900)
    assert urllib3.request("GET", active.json["url"]).data == b"\xff\xd8 photo"
    assert cli("purge", "img-1", "--yes").code == 0
    gone = cli("lookup", "img-1", "--url", "--json")
    assert gone.code == 3 and (gone.json["status"], gone.json["error"], gone.json["reason"]) == (404, "gone", "purge")
    assert "url" not in gone.stdout
    unknown = cli("lookup", "nobody", "--url", "--json")
    assert (unknown.code, unknown.json) == (3, {"id": "nobody", "status": 404, "error": "not_found"})


def test_lookup_url_never_outlives_the_item_and_an_expired_item_exits_three(cli, on_s3, database, monkeypatch, tmp_path):
    """On SQLite and PostgreSQL: five minutes left under a 15m PRESIGN_TTL, the URL lives those five minutes
    (expires_in, expires_at); past its expiry and unswept, exit 3 with the gone body."""
    monkeypatch.setenv("MEDIA_RETENTION_DATABASE_URL", database.url)
    get_settings.cache_clear()
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(b"\xff\xd8 photo")
    now = database_time(database)
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    for media_id, age in (("soon-1", timedelta(minutes=55)), ("old-1", timedelta(hours=2))):
        registered = cli("register", "--org", "acme", "--file", str(upload), "--id", media_id, "--ttl", "1h",
                         "--created-at", (now - age).isoformat(), "--json")
        assert registered.code == 0, registered.stderr
    soon = cli("lookup", "soon-1", "--url", "--json")
    assert soon.code == 0 and 290 < soon.json["expires_in"] <= 300
    expiry = now + timedelta(minutes=5)
    assert expiry - timedelta(seconds=1) < datetime.fromisoformat(soon.json["expires_at"]) <= expiry
    gone = cli("lookup", "old-1", "--url", "--json")
    assert gone.code == 3 and "url" not in gone.json
    assert {k: gone.json[k] for k in ("status", "error", "reason", "state")} == {
        "status": 404, "error": "gone", "reason": "ttl", "state": "expired"}


def test_register_key_adopts_an_object_already_in_the_bucket(cli, on_s3, objects):
    """register --key takes an existing object under the prefix, its size read from the store."""
    objects.put(on_s3, [f"{PREFIX}/imported/clip.mp4"], b"v" * 4096)
    assert cli("org", "set", "acme").code == 0
    result = cli("register", "--org", "acme", "--key", "imported/clip.mp4", "--json")
    assert result.code == 0, result.stderr
    assert (result.json["key"], result.json["size"], result.json["mime"]) == ("imported/clip.mp4", 4096, "video/mp4")
    missing = cli("register", "--org", "acme", "--key", "imported/none.mp4")
    assert missing.code == 2 and "no blob at storage key" in missing.stderr


def test_lookup_url_on_the_filesystem_store_exits_two_with_one_sentence(cli, tmp_path):
    """On the embedded file:// store, lookup --url is bad input (exit 2) saying an object store is needed."""
    result = cli("lookup", "img-1", "--url")
    assert result.code == 2
    assert "needs an object store" in result.stderr and result.stderr.count("\n") == 1
