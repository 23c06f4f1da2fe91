"""What an expiry deletion costs the catalog: row writes and WAL bytes per deleted item, for the one-transaction
sweep (PostgreSQL's expiry path) against the two-phase sweep (claim committed, then finalize: what purges and
SQLite still run) on identical catalogs in the same run.

    .venv/bin/pytest tests/bench/bench_sweep_writes.py -s -o addopts=-ra -o python_files='bench_*.py'

Target (issue #22): <= 1.05 catalog row writes (pg_stat_user_tables inserts + updates + deletes over every
table of the catalog) and <= 807 B of WAL per deletion (half of the 1,614 B the two-phase sweep wrote at filing),
sweeping 100,000 expired 1 KiB items. The store is the in-memory one (`worker/store/memory.py`) holding a 1 KiB
blob per item: what is measured is the catalog's side, which does not depend on the store.

WAL is measured two ways: `pg_current_wal_lsn()` before and after (the whole cluster's WAL, so anything else
writing to the server meanwhile counts too: run it on a quiet server for that column), and the catalog's own
share, read back with pg_waldump over the same range: every record on one of the catalog's relations (tables,
indexes, TOAST: full-page images included) plus the commit records of the transactions that wrote them. A
CHECKPOINT precedes each run, so both pay their full-page images the same way (the first change of each page
after a checkpoint logs the whole page).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import text

from tests.bench.support import fill_catalog, machine, table
from tests.factories import mark_store
from worker.db import Database
from worker.store.memory import MemoryStore
from worker.sweep import Sweeper

pytestmark = pytest.mark.postgres

ITEMS = int(os.environ.get("BENCH_WRITES_ITEMS", "100000"))
ROUNDS = int(os.environ.get("BENCH_WRITES_ROUNDS", "1"))
TARGET_WRITES, TARGET_WAL = 1.05, 807
# Experiments (not the default): the table's fillfactor when the catalog is filled (room on each page for the new
# row versions), and wal_compression for the sweep's sessions (a server setting in production; a superuser may
# set it per session, which is how this measures it).
FILLFACTOR = os.environ.get("BENCH_WRITES_FILLFACTOR")
WAL_COMPRESSION = os.environ.get("BENCH_WRITES_WAL_COMPRESSION")
WALDUMP = shutil.which("pg_waldump") or "/usr/lib/postgresql/15/bin/pg_waldump"
WAL_DIR = os.environ.get("BENCH_WAL_DIR", "/var/lib/postgresql/15/main/pg_wal")
RECORD = re.compile(r"rmgr: (\w+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), lsn: \S+, prev \S+, desc: (\w+)(.*)")


def schema_of(db: Database) -> str:
    with db.transaction() as session:
        return session.scalar(text("SELECT current_schema()"))


def fresh_catalog(db: Database) -> MemoryStore:
    """ITEMS expired items (1 KiB each, one-day TTL, expired two hours ago) in an emptied catalog, vacuumed and
    analyzed, autovacuum off for the run (its WAL is not the sweep's), and a memory store holding their blobs."""
    with db.engine.begin() as connection:
        connection.execute(text("TRUNCATE media_items, media_variants, audit_events, organizations, sweep_runs CASCADE"))
        if FILLFACTOR:
            connection.execute(text(f"ALTER TABLE media_items SET (fillfactor = {int(FILLFACTOR)})"))
    fill_catalog(db, ITEMS, prefix="item", expired=ITEMS)
    store = MemoryStore("bench")
    with db.engine.begin() as connection:
        keys = connection.execute(text("SELECT storage_key FROM media_items")).scalars().all()
        for name in ("media_items", "media_variants", "audit_events", "organizations"):
            connection.execute(text(f"ALTER TABLE {name} SET (autovacuum_enabled = false)"))
    blob = b"x" * 1024
    for key in keys:
        store.put_bytes(key, blob)
    mark_store(db, store)
    return store


def row_writes(db: Database, schema: str) -> int:
    """Inserts + updates + deletes so far over every table of the catalog's schema."""
    with db.transaction() as session:
        return int(session.scalar(text("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
                                       "WHERE schemaname = :schema"), {"schema": schema}))


def settled_row_writes(db: Database, schema: str) -> int:
    """`row_writes` once every backend that wrote has reported (stats are flushed at most once a second, and at exit)."""
    last, stable = row_writes(db, schema), 0
    while stable < 3:
        time.sleep(0.6)
        now = row_writes(db, schema)
        stable = stable + 1 if now == last else 0
        last = now
    return last


def relfilenodes(db: Database, schema: str) -> set[str]:
    """`tablespace/database/relfilenode` of every relation of the schema (tables, indexes, TOAST and its index)."""
    with db.transaction() as session:
        database_oid = session.scalar(text("SELECT oid FROM pg_database WHERE datname = current_database()"))
        default_space = session.scalar(text("SELECT oid FROM pg_tablespace WHERE spcname = 'pg_default'"))
        rows = session.execute(text(
            "SELECT c.reltablespace, pg_relation_filenode(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema OR c.oid IN (SELECT reltoastrelid FROM pg_class k JOIN pg_namespace m "
            "ON m.oid = k.relnamespace WHERE m.nspname = :schema) "
            "OR c.oid IN (SELECT i.indexrelid FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
            "WHERE t.oid IN (SELECT reltoastrelid FROM pg_class k JOIN pg_namespace m ON m.oid = k.relnamespace "
            "WHERE m.nspname = :schema))"), {"schema": schema}).all()
    return {f"{space or default_space}/{database_oid}/{node}" for space, node in rows if node}


def own_wal(start: str, end: str, relations: set[str]) -> tuple[int, Counter, int]:
    """The catalog's WAL between two LSNs: bytes of every record on one of `relations` plus the commit records of
    their transactions; bytes by record kind; and the full-page image bytes among them. (0, {}, 0) without
    pg_waldump or access to the WAL directory."""
    if not (os.path.exists(WALDUMP) and os.access(WAL_DIR, os.R_OK)):
        return 0, Counter(), 0
    dump = subprocess.run([WALDUMP, "-p", WAL_DIR, "-s", start, "-e", end], capture_output=True, text=True)
    kinds: Counter = Counter()
    fpi = 0
    ours_tx: set[str] = set()
    commits: dict[str, int] = {}
    for line in dump.stdout.splitlines():
        match = RECORD.match(line)
        if not match:
            continue
        rmgr, record, total, tx, kind, rest = match.groups()
        if rmgr == "Transaction" and kind.startswith("COMMIT"):
            commits[tx] = int(total)
            continue
        named = re.findall(r"rel (\d+/\d+/\d+)", rest)
        if named and any(name in relations for name in named):
            kinds[f"{rmgr} {kind}"] += int(total)
            fpi += int(total) - int(record)
            ours_tx.add(tx)
    kinds["Transaction COMMIT"] = sum(size for tx, size in commits.items() if tx in ours_tx)
    return sum(kinds.values()), kinds, fpi


def measure(pg_database: Database, one_transaction: bool) -> dict:
    store = fresh_catalog(pg_database)
    schema = schema_of(pg_database)
    relations = relfilenodes(pg_database, schema)
    with pg_database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("CHECKPOINT"))
    writes_before = settled_row_writes(pg_database, schema)
    with pg_database.transaction() as session:
        start = session.scalar(text("SELECT pg_current_wal_lsn()::text"))
    url = pg_database.url + (f"%20-cwal_compression%3D{WAL_COMPRESSION}" if WAL_COMPRESSION else "")
    sweeping = Database(url)  # its own connections: closed (and their stats flushed) after the sweep
    started = time.perf_counter()
    try:
        counts = Sweeper(sweeping, store, claim_lease=timedelta(minutes=5), batch_size=1000,
                         one_transaction=one_transaction).sweep()
    finally:
        sweeping.dispose()
    seconds = time.perf_counter() - started
    with pg_database.transaction() as session:
        end = session.scalar(text("SELECT pg_current_wal_lsn()::text"))
        cluster_wal = int(session.scalar(text("SELECT pg_wal_lsn_diff(:end, :start)"), {"end": end, "start": start}))
    writes = settled_row_writes(pg_database, schema) - writes_before
    assert counts.deleted == ITEMS and counts.failed == 0, counts
    own, kinds, fpi = own_wal(start, end, relations)
    return {"path": "one transaction" if one_transaction else "two-phase (baseline)", "deleted": counts.deleted,
            "writes": writes / counts.deleted, "cluster_wal": cluster_wal / counts.deleted, "own_wal": own / counts.deleted,
            "fpi": fpi / counts.deleted, "kinds": kinds, "seconds": seconds}


def test_an_expiry_deletion_writes_its_row_once_and_half_the_wal(pg_database):
    """Print row writes and WAL bytes per deletion of both paths; the one-transaction path meets the targets."""
    print(f"\nmachine: {machine()}; {ITEMS:,} expired 1 KiB items (memory store), batches of 1,000, PostgreSQL "
          f"{pg_database.engine.dialect.server_version_info}; fillfactor {FILLFACTOR or 'default (100)'}, "
          f"wal_compression {WAL_COMPRESSION or 'server default'}")
    results = []
    for _ in range(ROUNDS):
        for one_transaction in (False, True):
            results.append(measure(pg_database, one_transaction))
    table("Catalog writes per expiry deletion", (
        "path", "items", "row writes / deletion", "WAL / deletion (cluster LSN diff)", "catalog's own WAL / deletion",
        "of which full-page images", "seconds"),
        [(r["path"], f"{r['deleted']:,}", f"{r['writes']:.3f}", f"{r['cluster_wal']:,.0f} B", f"{r['own_wal']:,.0f} B",
          f"{r['fpi']:,.0f} B", f"{r['seconds']:.1f}") for r in results])
    for result in results:
        if result["kinds"]:
            table(f"Catalog's own WAL by record kind, {result['path']} (bytes per deletion)", ("record", "bytes"),
                  [(kind, f"{size / result['deleted']:,.1f}") for kind, size in result["kinds"].most_common()])
    new = [r for r in results if r["path"] == "one transaction"]
    assert max(r["writes"] for r in new) <= TARGET_WRITES
    wal = [r["own_wal"] or r["cluster_wal"] for r in new]
    assert max(wal) <= TARGET_WAL, f"WAL per deletion {max(wal):.0f} B above {TARGET_WAL} B"


PIPELINE_ITEMS = int(os.environ.get("BENCH_PIPELINE_ITEMS", "20000"))


def test_batches_in_flight_overlap_one_batchs_store_io_with_anothers_catalog_work(pg_database, tmp_path, monkeypatch):
    """Items/s of the one-transaction sweep over real 1 KiB files (filesystem store) with one batch at a time
    against PIPELINE_DEPTH batches in flight, alternating, two rounds each: whether the pipeline still pays."""
    from tests.bench.support import write_tree
    from worker import sweep
    from worker.store.fs import FilesystemStore

    media = tmp_path / "media"
    depth = sweep.PIPELINE_DEPTH
    rows = []
    for round_ in range(2):
        for batches in (1, depth):
            with pg_database.engine.begin() as connection:
                connection.execute(text("TRUNCATE media_items, media_variants, audit_events, organizations, sweep_runs CASCADE"))
            fill_catalog(pg_database, PIPELINE_ITEMS, prefix="item", expired=PIPELINE_ITEMS)
            with pg_database.transaction() as session:
                keys = session.scalars(text("SELECT storage_key FROM media_items")).all()
            shutil.rmtree(media, ignore_errors=True)
            media.mkdir()
            write_tree(media, keys)
            store = FilesystemStore(media)
            mark_store(pg_database, store)
            monkeypatch.setattr(sweep, "PIPELINE_DEPTH", batches)
            started = time.perf_counter()
            counts = Sweeper(pg_database, store, claim_lease=timedelta(minutes=5), batch_size=1000).sweep()
            seconds = time.perf_counter() - started
            store.close()
            assert counts.deleted == PIPELINE_ITEMS
            rows.append((round_ + 1, batches, f"{PIPELINE_ITEMS / seconds:,.0f}", f"{seconds:.2f}"))
    print(f"\nmachine: {machine()}")
    table("One-transaction sweep, filesystem store: batches in flight", ("round", "batches in flight", "items/s", "seconds"),
          rows)
