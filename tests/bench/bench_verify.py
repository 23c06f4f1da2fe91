"""verify on a million items: its memory stays flat (and how long it takes), PostgreSQL catalog.

    make bench   (or: .venv/bin/pytest tests/bench/bench_verify.py -s -o addopts=-ra -o python_files='bench_*.py')

The catalog is real (a million rows in a PostgreSQL schema of its own, inserted with one
generate_series statement). The store is a listing generated in key order without I/O, so the
figures are verify's own: paging the catalog, merging, checking; not a disk's or a server's speed.
Memory is what Python allocated (tracemalloc's peak) for 100,000 and for 1,000,000 items: flat means
the second is not ten times the first.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from worker.store import BlobInfo, BlobStore
from worker.verify import Verifier

pytestmark = pytest.mark.postgres

SIZES = (100_000, 1_000_000)
OLD = datetime(2026, 1, 1, tzinfo=timezone.utc)


class GeneratedListing(BlobStore):
    """Blobs `k/00000000` ... in key order, each 10 bytes, as a store would list them."""

    url = "generated://"

    def __init__(self, count: int):
        self.count = count

    def iter_keys(self, *, ordered: bool = False, partial_uploads: bool = False) -> Iterator[BlobInfo]:
        for number in range(self.count):
            yield BlobInfo(key=f"k/{number:08d}", size=10, modified=OLD)

    def stat(self, key):
        return BlobInfo(key=key, size=10, modified=OLD)

    def put_file(self, key, source):
        raise NotImplementedError

    def delete_many(self, keys):
        raise NotImplementedError


def fill(db, count: int) -> None:
    with db.engine.begin() as connection:
        connection.execute(text("DELETE FROM media_items"))
        connection.execute(text("DELETE FROM organizations"))
        connection.execute(text("INSERT INTO organizations (id, retention_seconds) VALUES ('acme', 2592000)"))
        connection.execute(text(
            "INSERT INTO media_items (id, org_id, storage_key, size_bytes, mime_type, created_at, ttl_seconds, expires_at, state) "
            "SELECT 'm' || n, 'acme', 'k/' || lpad(n::text, 8, '0'), 10, 'image/jpeg', now() - interval '1 hour', 7200, "
            "now() + interval '1 hour', 'active' FROM generate_series(0, :count - 1) AS n"), {"count": count})
        connection.execute(text("ANALYZE media_items"))


def test_verify_memory_is_flat_from_a_hundred_thousand_to_a_million_items(pg_database):
    """Peak Python memory of a clean verify over 1M items stays within twice that over 100k."""
    peaks = {}
    for count in SIZES:
        fill(pg_database, count)
        tracemalloc.start()
        started = time.monotonic()
        report = Verifier(pg_database, GeneratedListing(count)).run(grace=timedelta(days=1), stuck_after=timedelta(days=1))
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.clean and report.items_checked == count == report.blobs_listed, report.to_dict()
        peaks[count] = peak
        print(f"\nverify {count:>9,} items: {seconds:6.1f} s ({count / seconds:,.0f} items/s), peak Python memory {peak / 2**20:.1f} MiB")
    assert peaks[SIZES[1]] < 2 * peaks[SIZES[0]], peaks
