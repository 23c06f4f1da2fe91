"""Catalog import by key: `register --manifest` of 100,000 blobs already in the store, into a catalog that
already holds a million rows, against the same import's batches into a catalog of 10,000 rows.

    make bench   (or: .venv/bin/pytest tests/bench/bench_import.py -s -o addopts=-ra -o python_files='bench_*.py')

Targets (issue #11): at least 20,000 items/s for the whole command (check and import, a process as an
operator runs it), and a batch at a million rows costing at most 1.2x a batch at ten thousand: the
import's statements stay index lookups however large the table grows.

Per-batch times come from the command's own `cli.progress` events (one per committed batch, JSON logs):
the time between two events is one batch's share of the pace (the import writes two batches at once,
each a transaction with its COPY and audit entry). The big import runs ROUNDS times (its rows removed
and the table vacuumed between rounds) and the median round is the figure: on a shared 2-core VM one
round moves by 15 % from the next.
"""

from __future__ import annotations

import json
import os
import statistics
from datetime import datetime
from pathlib import Path

import pytest

from sqlalchemy import text

from tests.bench.support import CLI, cli_env, fill_catalog, machine, run, table, vacuum_analyze, write_tree
from worker.catalog.manifest import MANIFEST_BATCH

pytestmark = pytest.mark.postgres

IMPORTED = int(os.environ.get("BENCH_IMPORT_ITEMS", "100000"))
LARGE, SMALL = 1_000_000, 10_000
ROUNDS = int(os.environ.get("BENCH_IMPORT_ROUNDS", "3"))
TARGET_ITEMS_PER_S = 20_000
TARGET_BATCH_RATIO = 1.2


def manifest(path: Path, prefix: str, count: int) -> tuple[Path, list[str]]:
    keys = [f"legacy/{prefix}/{number // 1000:03d}/{prefix}-{number}.jpg" for number in range(count)]
    with open(path, "w") as handle:
        for number, key in enumerate(keys):
            handle.write(json.dumps({"org": "bench", "id": f"{prefix}-{number}", "key": key, "ttl": "30d"}) + "\n")
    return path, keys


def batch_seconds(result) -> list[float]:
    """Seconds between consecutive batch commits, from the progress events' timestamps."""
    stamps = [datetime.fromisoformat(event["timestamp"]) for event in result.events("cli.progress")]
    return [(later - earlier).total_seconds() for earlier, later in zip(stamps, stamps[1:])]


def test_import_by_key_keeps_its_pace_and_its_batch_cost_as_the_catalog_grows(pg_database, tmp_path):
    """Print items/s of a 100k-line import into a 1M-row catalog and per-batch times at 10k and at 1M rows."""
    media = tmp_path / "media"
    env = cli_env(pg_database.url, media.as_uri(), tmp_path / "data")

    # Baseline: batches into a catalog of 10,000 rows (the import adds 10,000: five batches, all near 10k).
    fill_catalog(pg_database, SMALL, prefix="small")
    path, keys = manifest(tmp_path / "small.jsonl", "s", 5 * MANIFEST_BATCH)
    write_tree(media, keys, size=100)
    small = run([CLI, "register", "--manifest", str(path), "--json"], env=env)
    assert small.code == 0, small.stderr[-2000:]
    small_batches = batch_seconds(small)

    # The measured import: 100,000 lines into a catalog of a million rows.
    fill_catalog(pg_database, LARGE - SMALL - 5 * MANIFEST_BATCH, prefix="large", start=SMALL)
    path, keys = manifest(tmp_path / "large.jsonl", "l", IMPORTED)
    write_tree(media, keys, size=100)
    rounds, large_batches = [], []
    for round_number in range(ROUNDS):
        if round_number:
            with pg_database.engine.begin() as connection:  # the same import again, into the same million rows
                connection.execute(text("DELETE FROM media_items WHERE id LIKE 'l-%'"))
            vacuum_analyze(pg_database)
        large = run([CLI, "register", "--manifest", str(path), "--json"], env=env)
        assert large.code == 0, large.stderr[-2000:]
        assert large.json["imported"] == IMPORTED
        rounds.append(large.seconds)
        large_batches += batch_seconds(large)

    seconds = statistics.median(rounds)
    rate = IMPORTED / seconds
    small_median, large_median = statistics.median(small_batches), statistics.median(large_batches)
    ratio = large_median / small_median
    table(f"catalog import by key, PostgreSQL, filesystem store, batches of {MANIFEST_BATCH}; {machine()}",
          ("figure", "measured", "target"),
          [(f"`register --manifest`, {IMPORTED:,} keys into {LARGE:,} rows (whole process, median of {ROUNDS} rounds)",
            f"{rate:,.0f} items/s ({', '.join(f'{r:.1f}' for r in rounds)} s; peak RSS {large.max_rss_bytes / 2**20:.0f} MiB)",
            f">= {TARGET_ITEMS_PER_S:,} items/s"),
           (f"batch at {SMALL:,} rows (median of {len(small_batches)})", f"{small_median * 1000:.0f} ms", "baseline"),
           (f"batch at {LARGE:,} rows (median of {len(large_batches)})", f"{large_median * 1000:.0f} ms", ""),
           ("ratio", f"{ratio:.2f}", f"<= {TARGET_BATCH_RATIO}")])
    assert rate >= TARGET_ITEMS_PER_S
    assert ratio <= TARGET_BATCH_RATIO
