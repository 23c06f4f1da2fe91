"""`adopt`: a volume or bucket without a catalog taken over, on both stores and both databases."""

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.s3 import PREFIX
from worker.catalog import adopt as adopt_module
from worker.catalog.audit import AuditTrail
from config.errors import NotFound
from worker.models import MediaItem

DAY = timedelta(days=1)


def put(root: Path, key: str, age: timedelta, body: bytes = b"x" * 10) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    stamp = (datetime.now(timezone.utc) - age).timestamp()
    os.utime(path, (stamp, stamp))
    return path


def items_by_key(catalog) -> dict[str, MediaItem]:
    with catalog.db.transaction() as session:
        rows = session.scalars(select(MediaItem)).all()
        session.expunge_all()
    return {row.storage_key: row for row in rows}


@pytest.fixture
def volume(catalog, media_root):
    """A WhatsApp-style volume: old media, recent media, an upload in flight, one file already catalogued."""
    catalog.set_org("acme", "30d")
    put(media_root, "2026/01/old-1.jpg", timedelta(days=60), b"o" * 100)
    put(media_root, "2026/01/old-2.ogg", timedelta(days=45), b"o" * 50)
    put(media_root, "2026/11/recent.jpg", timedelta(days=2), b"r" * 20)
    put(media_root, "2026/11/.incoming-0123456789abcdef", timedelta(days=3))  # our own upload in flight
    put(media_root, "2026/11/being-written.jpg", timedelta(seconds=5))  # upstream still writing
    put(media_root, "known/k.jpg", timedelta(days=90))
    catalog.register(org="acme", key="known/k.jpg", media_id="known-1")
    return media_root


def test_adopt_registers_unknown_blobs_with_their_modification_time_and_the_sweep_deletes_the_due_ones(catalog, volume):
    """Old and recent files become items created at their mtime; the count of due ones is what the next sweep deletes;
    in-flight uploads, files still being written and catalogued keys are left alone."""
    summary = catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops")
    assert (summary.listed, summary.known, summary.adopted, summary.too_young) == (5, 1, 3, 1)
    assert (summary.due, summary.due_bytes, summary.adopted_bytes) == (2, 150, 170)
    rows = items_by_key(catalog)
    assert set(rows) == {"known/k.jpg", "2026/01/old-1.jpg", "2026/01/old-2.ogg", "2026/11/recent.jpg"}
    mtime = datetime.fromtimestamp((volume / "2026/01/old-1.jpg").stat().st_mtime, timezone.utc)
    assert abs(rows["2026/01/old-1.jpg"].created_at - mtime) < timedelta(milliseconds=2)
    assert rows["2026/01/old-1.jpg"].mime_type == "image/jpeg" and rows["2026/01/old-1.jpg"].size_bytes == 100

    counts = catalog.sweeper.sweep()
    assert counts.deleted == summary.due and counts.bytes_freed == summary.due_bytes
    assert not (volume / "2026/01/old-1.jpg").exists() and (volume / "2026/11/recent.jpg").exists()
    assert (volume / "2026/11/.incoming-0123456789abcdef").exists() and (volume / "2026/11/being-written.jpg").exists()
    [entry] = AuditTrail(catalog.db).read(org="acme", action="adopt").entries
    assert (entry.actor, entry.details["count"], entry.details["bytes"]) == ("ops", 3, 170)


def test_adopt_is_idempotent_and_a_dry_run_changes_nothing(catalog, volume):
    """A dry run registers nothing; a second real run finds every blob known and adopts nothing."""
    preview = catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops", dry_run=True)
    assert preview.adopted == 3 and len(items_by_key(catalog)) == 1
    catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops")
    again = catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops")
    assert (again.adopted, again.known) == (0, 4)


def test_adopt_under_a_prefix_and_with_a_ttl(catalog, volume):
    """--under limits the adoption to one directory; --ttl sets each item's TTL instead of the org retention."""
    summary = catalog.adopter().run(org="acme", under="2026/01/", ttl=timedelta(days=30), grace=timedelta(minutes=10), actor="ops")
    assert summary.adopted == 2
    rows = items_by_key(catalog)
    assert {key for key in rows if key.startswith("2026/")} == {"2026/01/old-1.jpg", "2026/01/old-2.ogg"}
    assert rows["2026/01/old-2.ogg"].ttl_seconds == 30 * 86400


def test_adopt_resumes_after_a_crash_without_duplicates(catalog, media_root, monkeypatch):
    """Killed after its first batch, a re-run registers the rest: every blob once."""
    catalog.set_org("acme", "30d")
    for number in range(7):
        put(media_root, f"m/{number}.bin", timedelta(days=1))
    monkeypatch.setattr(adopt_module, "ADOPT_BATCH", 3)
    real_adopt, calls = catalog.registration.adopt_batch, []

    def killed_on_second_batch(items, audit):
        calls.append(len(items))
        if len(calls) == 2:
            raise SystemExit("SIGKILL")
        return real_adopt(items, audit)

    monkeypatch.setattr(catalog.registration, "adopt_batch", killed_on_second_batch)
    with pytest.raises(SystemExit):
        catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops")
    assert len(items_by_key(catalog)) == 3
    monkeypatch.setattr(catalog.registration, "adopt_batch", real_adopt)
    resumed = catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops")
    assert (resumed.known, resumed.adopted) == (3, 4)
    with catalog.db.transaction() as session:
        assert session.scalar(select(func.count(func.distinct(MediaItem.storage_key)))) == 7


def test_adopt_into_an_unknown_org_is_refused(catalog):
    """The org must exist: nothing is listed or registered otherwise."""
    with pytest.raises(NotFound):
        catalog.adopter().run(org="nobody", grace=timedelta(minutes=10), actor="ops")


def test_adopt_on_an_object_store_uses_last_modified(s3_catalog, bucket, objects):
    """On S3 the listing's LastModified is the creation time; objects outside the prefix are never adopted."""
    s3_catalog.set_org("acme", "30d")
    objects.put(bucket, [f"{PREFIX}/a/old.jpg"], age=timedelta(days=40))
    objects.put(bucket, [f"{PREFIX}/a/new.jpg"], age=timedelta(days=1))
    objects.put(bucket, ["elsewhere/x.jpg", f"{PREFIX}-old/y.jpg"], age=timedelta(days=40))
    summary = s3_catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops")
    assert (summary.adopted, summary.due) == (2, 1)
    assert set(items_by_key(s3_catalog)) == {"a/old.jpg", "a/new.jpg"}
    assert s3_catalog.sweeper.sweep().deleted == 1
    assert objects.names(bucket) == {f"{PREFIX}/a/new.jpg", "elsewhere/x.jpg", f"{PREFIX}-old/y.jpg"}


def test_adopt_on_the_command_line_asks_first_and_says_how_much_the_next_sweep_deletes(cli, data_dir):
    """Without --yes and a terminal it refuses with the amounts and registers nothing; --yes adopts; --dry-run previews."""
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    media = data_dir / "media"
    put(media, "v/old.jpg", timedelta(days=40), b"o" * 30)
    put(media, "v/new.jpg", timedelta(days=1))
    refused = cli("adopt", "--org", "acme")
    assert refused.code == 2 and "adopt 2 blobs (40 bytes)" in refused.stderr and "1 of them (30 bytes)" in refused.stderr
    preview = cli("adopt", "--org", "acme", "--dry-run", "--json")
    assert preview.code == 0 and preview.json["adopted"] == 2 and preview.json["due"] == 1
    assert cli("lookup", "nothing", "--json").code == 3
    done = cli("adopt", "--org", "acme", "--yes", "--json")
    assert done.code == 0 and (done.json["adopted"], done.json["dry_run"]) == (2, False)
    assert cli("adopt", "--org", "acme", "--yes", "--json").json["adopted"] == 0
    assert cli("adopt", "--org", "nobody", "--yes").code == 3
    assert cli("adopt", "--org", "acme", "--ttl", "90d", "--yes").code == 2


def test_adopt_memory_stays_flat_however_many_blobs_the_store_lists(catalog):
    """Listing 4,000 or 40,000 blobs (a dry run: pages checked against the catalog) peaks at about the same memory."""
    import tracemalloc

    from worker.store import BlobInfo, BlobStore

    class GeneratedListing(BlobStore):
        url = "generated://"

        def __init__(self, count):
            self.count = count

        def iter_keys(self, *, ordered=False, partial_uploads=False):
            old = datetime(2026, 1, 1, tzinfo=timezone.utc)
            for number in range(self.count):
                yield BlobInfo(key=f"k/{number:08d}.jpg", size=10, modified=old)

        def stat(self, key):
            raise NotImplementedError

        def put_file(self, key, source):
            raise NotImplementedError

        def delete_many(self, keys):
            raise NotImplementedError

        def read_marker(self):
            raise NotImplementedError

        def write_marker(self, content):
            raise NotImplementedError

    catalog.set_org("acme", "30d")
    peaks, real_store = {}, catalog.registration.store
    try:
        for count in (4_000, 40_000):
            catalog.registration.store = GeneratedListing(count)
            tracemalloc.start()
            summary = catalog.adopter().run(org="acme", grace=timedelta(minutes=10), actor="ops", dry_run=True)
            peaks[count] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert summary.adopted == count
    finally:
        catalog.registration.store = real_store
    assert peaks[40_000] < 2 * peaks[4_000], peaks
