"""Memory of a sweep draining a large backlog: the peak resident set of `media-retention sweep` over a
backlog of 1,000,000 expired items against the same over 10,000.

    make bench   (or: .venv/bin/pytest tests/bench/bench_rss.py -s -o addopts=-ra -o python_files='bench_*.py')

Targets (issue #11, DESIGN invariant 7): the 1M drain peaks at most 1.1x the 10k one, and under 150 MB.
The peak is the kernel's high-water mark of that process (wait4's ru_maxrss). The blobs are absent
(each unlink answers ENOENT, which counts as deleted): the figure is the process's own memory, not the
page cache of a million files, and a million inodes need not be made first.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from tests.bench.support import CLI, cli_env, fill_catalog, machine, run, table

pytestmark = pytest.mark.postgres

SMALL, LARGE = 10_000, int(os.environ.get("BENCH_RSS_ITEMS", "1000000"))
TARGET_RATIO, TARGET_BYTES = 1.1, 150 * 2**20


def test_draining_a_million_item_backlog_takes_no_more_memory_than_ten_thousand(pg_database, tmp_path):
    """Print the peak RSS of a sweep over 10k and over 1M expired items, and their ratio."""
    env = cli_env(pg_database.url, (tmp_path / "media").as_uri(), tmp_path / "data")
    peaks, seconds = {}, {}
    for size, prefix in ((SMALL, "small"), (LARGE, "large")):
        with pg_database.engine.begin() as connection:
            connection.execute(text("DELETE FROM media_items"))
        fill_catalog(pg_database, size, prefix=prefix, expired=size)
        swept = run([CLI, "sweep", "--json"], env=env)
        assert swept.code == 0, swept.stderr[-2000:]
        assert swept.json["deleted"] == size
        peaks[size], seconds[size] = swept.max_rss_bytes, swept.seconds
    ratio = peaks[LARGE] / peaks[SMALL]
    table(f"peak RSS of `media-retention sweep` draining a backlog, PostgreSQL, blobs absent; {machine()}",
          ("backlog", "peak RSS", "sweep", "ratio"),
          [(f"{SMALL:,} items (baseline)", f"{peaks[SMALL] / 2**20:.1f} MiB", f"{seconds[SMALL]:.1f} s", "1.00"),
           (f"{LARGE:,} items", f"{peaks[LARGE] / 2**20:.1f} MiB", f"{seconds[LARGE]:.1f} s",
            f"**{ratio:.2f}** (target <= {TARGET_RATIO}, and < {TARGET_BYTES / 2**20:.0f} MiB)")])
    assert ratio <= TARGET_RATIO and peaks[LARGE] < TARGET_BYTES
