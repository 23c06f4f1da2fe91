"""The claim's cost as the catalog grows: one batch claimed from a catalog of 100,000 rows and from one
of 10,000,000, the same number due in each, with the plan PostgreSQL ran.

    make bench   (or: .venv/bin/pytest tests/bench/bench_claim_scale.py -s -o addopts=-ra -o python_files='bench_*.py')

Target (issue #11, DESIGN invariant 7): a claim at 10M rows costs at most 1.2x one at 100k. The claim
reads the partial index of claimable items by expiry (`ix_media_items_claimable_expiry`) from its
start, so its cost follows the batch, not the table. Ten million rows take a few minutes to make
(one generate_series) and about 4 GB of disk.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
from sqlalchemy import text

from config.settings import load_settings
from tests.bench.support import fill_catalog, machine, table, vacuum_analyze
from worker.engine import build
from worker.volume.measure import live_media_bytes

pytestmark = pytest.mark.postgres

SMALL, LARGE = 100_000, int(os.environ.get("BENCH_CLAIM_ROWS", "10000000"))
DUE = 30_000  # expired rows in each catalog: the claims take 20 batches of them
CLAIMS = 20
BATCH = 1000
TARGET_RATIO = 1.2


def claim_times(sweeper) -> list[float]:
    times = []
    for _ in range(CLAIMS):
        started = time.perf_counter()
        claimed = sweeper.claim_expired(BATCH)
        times.append(time.perf_counter() - started)
        assert len(claimed) == BATCH
    return times


def explain(db, sweeper) -> str:
    """EXPLAIN ANALYZE of the fresh claim on a batch, rolled back."""
    with db.engine.connect() as connection:
        transaction = connection.begin()
        lines = connection.execute(text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + str(sweeper._claims.expired_statement)),
                                   {"token": "explain", "limit": BATCH}).scalars().all()
        transaction.rollback()
    return "\n".join(lines)


def sizes(db) -> list[tuple[str, str, str]]:
    """The table and each index on disk, and bytes a row: what docs/scale.md's plan for a billion rows scales from."""
    with db.engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*) FROM media_items")).scalar()
        found = connection.execute(text("""
            SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c
            WHERE c.oid = 'media_items'::regclass
               OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'media_items'::regclass)
            ORDER BY 2 DESC""")).all()
    return [(name, f"{size / 2**20:,.0f} MiB", f"{size / rows:.0f}") for name, size in found]


def release_claims(db) -> None:
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE media_items SET state = 'active', claim_token = NULL, claimed_at = NULL, "
                                "lease_until = NULL, deletion_reason = NULL WHERE state = 'deleting'"))
    vacuum_analyze(db)


def test_a_claim_costs_the_same_at_ten_million_rows_as_at_a_hundred_thousand(pg_database, tmp_path):
    """Print the median claim time of a 1,000-item batch at 100k and at 10M rows, their ratio, and both plans."""
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url,
                             storage_url=(tmp_path / "media").as_uri())
    sweeper = build(settings, database=pg_database).sweeper

    fill_catalog(pg_database, SMALL, prefix="row", expired=DUE)
    small_plan = explain(pg_database, sweeper)
    small = statistics.median(claim_times(sweeper))
    release_claims(pg_database)

    fill_catalog(pg_database, LARGE - SMALL, prefix="row", start=SMALL)
    large_plan = explain(pg_database, sweeper)
    large = statistics.median(claim_times(sweeper))
    # What else reads the whole live catalog on a schedule: an object store's volume check sums the live
    # bytes every 5 minutes (docs/scale.md).
    started = time.perf_counter()
    live_media_bytes(pg_database)
    live_bytes_seconds = time.perf_counter() - started

    table(f"claim of one batch ({BATCH:,} of {DUE:,} due), PostgreSQL, median of {CLAIMS}; {machine()}",
          ("catalog", "claim", "ratio"),
          [(f"{SMALL:,} rows (baseline)", f"{small * 1000:.1f} ms", "1.00"),
           (f"{LARGE:,} rows", f"{large * 1000:.1f} ms", f"**{large / small:.2f}** (target <= {TARGET_RATIO})"),
           (f"{LARGE:,} rows: an object store's volume check (sum of live bytes)", f"{live_bytes_seconds * 1000:,.0f} ms", "")])
    print(f"\nplan at {SMALL:,} rows:\n{small_plan}\n\nplan at {LARGE:,} rows:\n{large_plan}")
    table(f"media_items on disk at {LARGE:,} rows (all active but {CLAIMS * BATCH:,} claimed)", ("relation", "size", "bytes a row"),
          sizes(pg_database))
    assert "ix_media_items_claimable_expiry" in large_plan
    assert large / small <= TARGET_RATIO
