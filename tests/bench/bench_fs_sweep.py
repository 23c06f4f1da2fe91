"""Filesystem sweep against `find -delete`: 100,000 expired 1 KiB items among a million catalog rows,
`media-retention sweep` run as an operator runs it, against `find ROOT -type f -delete` on an identical
tree, alternating, in the same run.

    make bench   (or: .venv/bin/pytest tests/bench/bench_fs_sweep.py -s -o addopts=-ra -o python_files='bench_*.py')

Target (issue #11): the sweep deletes at least 1.5x as many items a second as find. find does no
bookkeeping at all; the sweep claims each batch in the catalog (committed before a blob is touched),
unlinks with a few threads and records the tombstones, so the ratio says what the pipeline hides.
Both sides include their process start.
"""

from __future__ import annotations

import os
import statistics

import pytest
from sqlalchemy import text

from tests.bench.support import (CLI, cli_env, fill_catalog, machine, postgres_cpu_seconds, remove_tree, run, table,
                                 vacuum_analyze, write_tree)
from worker.store.keys import key_for_id

pytestmark = pytest.mark.postgres

EXPIRED = int(os.environ.get("BENCH_FS_EXPIRED", "100000"))
CATALOG = int(os.environ.get("BENCH_FS_CATALOG", "1000000"))
ROUNDS = int(os.environ.get("BENCH_FS_ROUNDS", "3"))
TARGET_RATIO = 1.5


def reset(db) -> None:
    """The expired rows active again (same ids, keys and expiry), the catalog vacuumed: the next round
    finds exactly what the first did."""
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE media_items SET state = 'active', deleted_at = NULL, deletion_reason = NULL, "
                                "claim_token = NULL, claimed_at = NULL, lease_until = NULL WHERE state <> 'active'"))
        connection.execute(text("DELETE FROM audit_events"))
        connection.execute(text("DELETE FROM sweep_runs"))
    vacuum_analyze(db)


def test_a_sweep_deletes_faster_than_find_on_the_same_tree(pg_database, tmp_path):
    """Print items/s of `media-retention sweep` and of `find -type f -delete` over ROUNDS alternating rounds."""
    media, baseline = tmp_path / "media", tmp_path / "find"
    fill_catalog(pg_database, CATALOG, prefix="item", expired=EXPIRED)
    keys = [key_for_id(f"item-{number}") for number in range(EXPIRED)]
    env = cli_env(pg_database.url, media.as_uri(), tmp_path / "data")
    sweeps, finds, process_cpus, database_cpus = [], [], [], []
    for _ in range(ROUNDS):
        write_tree(baseline, keys)
        found = run(["find", str(baseline), "-type", "f", "-delete"])
        assert found.code == 0 and not any(path.is_file() for path in baseline.rglob("*"))
        finds.append(found.seconds)
        remove_tree(baseline)

        write_tree(media, keys)
        database_cpu = postgres_cpu_seconds()
        swept = run([CLI, "sweep", "--json"], env=env)
        database_cpus.append(postgres_cpu_seconds() - database_cpu)
        process_cpus.append((swept.cpu_seconds, swept.system_seconds))
        assert swept.code == 0, swept.stderr[-2000:]
        assert (swept.json["deleted"], swept.json["failed"], swept.json["already_missing"]) == (EXPIRED, 0, 0)
        assert not any(path.is_file() and path.name != ".media-retention.json" for path in media.rglob("*"))
        sweeps.append(swept.seconds)
        remove_tree(media)
        reset(pg_database)

    find_rate, sweep_rate = EXPIRED / statistics.median(finds), EXPIRED / statistics.median(sweeps)
    table(f"filesystem sweep, {EXPIRED:,} expired 1 KiB items among {CATALOG:,} rows, PostgreSQL, median of "
          f"{ROUNDS} alternating rounds; {machine()}",
          ("", "items/s", "seconds (rounds)", "ratio"),
          [("`find ROOT -type f -delete` (baseline)", f"{find_rate:,.0f}", ", ".join(f"{s:.2f}" for s in finds), "1.00"),
           ("`media-retention sweep`", f"{sweep_rate:,.0f}", ", ".join(f"{s:.2f}" for s in sweeps),
            f"**{sweep_rate / find_rate:.2f}** (target >= {TARGET_RATIO})")])
    # Where a sweep's time goes: the process's own CPU (Python, the unlinks' system calls) and PostgreSQL's.
    table("where the sweep's time goes, per round (CPU seconds; 2 cores)",
          ("round", "wall", "sweep process CPU", "of which system (unlinks)", "PostgreSQL CPU"),
          [(str(number + 1), f"{wall:.2f}", f"{cpu:.2f}", f"{system:.2f}", f"{database:.2f}")
           for number, (wall, (cpu, system), database) in enumerate(zip(sweeps, process_cpus, database_cpus))])
    assert sweep_rate / find_rate >= TARGET_RATIO
