"""Holds by case (issue #23) against the claim, and a hold by query over a million items.

    .venv/bin/pytest tests/bench/bench_holds.py -s -o addopts=-ra -o python_files='bench_*.py'

(a) A claim of 1,000 from a catalog with 10,000 cases (item, org and query placements, overlapping) against
    the same catalog with none: the claim reads only `held_at`/`org_held` through its partial index (DESIGN
    invariant 7), so the ratio stays <= 1.2. `seed_policy` is the hook that puts policy in the catalog: the
    lead adds the 100 retention rules of issue #23 there.
(b) A hold by query over 1,000,000 matching items (one statement), timed, with a sweep running beside it on
    the same org: nothing the hold covers is deleted, and every matching item is held or was claimed first.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from config.settings import load_settings
from tests.bench.support import fill_catalog, machine, table, vacuum_analyze
from tests.factories import bind_store, database_time
from worker.engine import build

pytestmark = pytest.mark.postgres

ROWS = int(os.environ.get("BENCH_HOLDS_ROWS", "200000"))
DUE = 30_000  # expired, unheld rows of org `bench`: the claims take 20 batches of them
CLAIMS = 20
BATCH = 1000
TARGET_RATIO = 1.2
TENANTS = 500  # small orgs the org and query placements name
CASES = {"item": 6_000, "org": 2_000, "query": 2_000}
QUERY_ROWS = int(os.environ.get("BENCH_HOLDS_QUERY_ROWS", "1000000"))


def claim_times(sweeper) -> list[float]:
    """The pick of an expiry sweep on PostgreSQL (one transaction a batch): BATCH due rows locked FOR UPDATE SKIP
    LOCKED through the claimable index, in a transaction that then ends with nothing written (so every round
    finds the same rows)."""
    times = []
    for _ in range(CLAIMS):
        started = time.perf_counter()
        with sweeper.db.transaction() as session:
            picked = sweeper._claims.lock_expired(session, BATCH)
        times.append(time.perf_counter() - started)
        assert len(picked) == BATCH
    return times


def explain(db, sweeper) -> str:
    """EXPLAIN ANALYZE of the pick of one batch, rolled back."""
    with db.engine.connect() as connection:
        transaction = connection.begin()
        lines = connection.execute(text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) "
                                        + str(sweeper._claims.expired_lock_statement)), {"limit": BATCH}).scalars().all()
        transaction.rollback()
    return "\n".join(lines)


def seed_policy(catalog, *, seed: int = 23) -> dict[str, int]:
    """The policy a claim must not pay for: 10,000 cases placed through the catalog (6,000 item placements of one to
    five live rows of `bench` each; 2,000 org placements and 2,000 query placements with MIME patterns and
    include-future on the tenant orgs, several cases per org) and 100 retention rules. Returns what was made."""
    rng = random.Random(seed)
    now = database_time(catalog.db)
    made = {"item": 0, "org": 0, "query": 0}
    for number in range(CASES["item"]):
        # Live rows only: a hold never covers an item already gone by its expiry (expired is final, issue #22).
        ids = [f"row-{rng.randrange(DUE * 3, ROWS)}" for _ in range(rng.randint(1, 5))]
        catalog.set_hold(held=True, reason="bench", ids=ids, case=f"item-case-{number}", actor="bench")
        made["item"] += 1
    for number in range(CASES["org"]):
        catalog.set_hold(held=True, reason="bench", org=f"tenant-{number % TENANTS}", case=f"org-case-{number}", actor="bench")
        made["org"] += 1
    for number in range(CASES["query"]):
        days = rng.randint(1, 30)
        catalog.set_hold(held=True, reason="bench", org=f"tenant-{number % TENANTS}", case=f"query-case-{number}",
                         created_after=now - timedelta(days=days + 1), created_before=now - timedelta(days=days - 1),
                         mime=rng.choice((None, "image/*", "image/jpeg", "video/*")), include_future=number % 2 == 0,
                         actor="bench")
        made["query"] += 1
    # And 100 retention rules by content type (issue #23), on the tenant orgs: resolved into `expires_at` when set.
    patterns = ("image/*", "video/*", "image/jpeg", "audio/ogg")
    for number in range(100):
        catalog.rules.set(f"tenant-{number % TENANTS}", patterns[number // TENANTS % len(patterns)], "60d", actor="bench")
    made["rules"] = 100
    return made


def test_a_claim_costs_the_same_with_ten_thousand_cases_as_with_none(pg_database, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url,
                             storage_url=(tmp_path / "media").as_uri())
    (tmp_path / "media").mkdir()
    engine = build(settings, database=pg_database)
    sweeper, catalog = engine.sweeper, engine.catalog
    # Expired: the first 3 x DUE rows (a tenth of the third DUE get item holds); the claims take the first DUE.
    fill_catalog(pg_database, ROWS, prefix="row", expired=DUE * 3)
    fill_catalog(pg_database, 20_000, prefix="tenant-row", org="tenant", orgs=TENANTS)
    baseline_plan = explain(pg_database, sweeper)
    baseline = statistics.median(claim_times(sweeper))

    started = time.perf_counter()
    made = seed_policy(catalog)
    seeding = time.perf_counter() - started
    vacuum_analyze(pg_database)
    with pg_database.engine.connect() as connection:
        held = connection.execute(text("SELECT count(*) FROM media_items WHERE held_at IS NOT NULL OR org_held")).scalar()
        placements = connection.execute(text("SELECT count(*) FROM holds WHERE released_at IS NULL")).scalar()
    cases_plan = explain(pg_database, sweeper)
    with_cases = statistics.median(claim_times(sweeper))
    table(f"claim of one batch ({BATCH:,} of {DUE:,} due, {ROWS + 20_000:,} rows), PostgreSQL, median of {CLAIMS}; {machine()}",
          ("catalog", "claim", "ratio"),
          [("no cases (baseline)", f"{baseline * 1000:.1f} ms", "1.00"),
           (f"{placements:,} open placements ({made['item']:,} item, {made['org']:,} org, {made['query']:,} query), "
            f"{made['rules']} retention rules, {held:,} items held", f"{with_cases * 1000:.1f} ms", f"**{with_cases / baseline:.2f}** (target <= {TARGET_RATIO})")])
    print(f"seeding {sum(CASES.values()):,} placements and {made['rules']} rules through the catalog: {seeding:.1f} s")
    print(f"\nplan without cases:\n{baseline_plan}\n\nplan with cases:\n{cases_plan}")
    engine.close()
    assert placements == sum(CASES.values())
    assert with_cases / baseline <= TARGET_RATIO


def test_a_hold_by_query_over_a_million_items_beside_a_sweep_loses_none_of_them(pg_database, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url,
                             storage_url=(tmp_path / "media").as_uri())
    (tmp_path / "media").mkdir()
    engine = build(settings, database=pg_database)
    bind_store(engine)
    # Every row created a day ago, the first tenth expired two hours ago: the sweep beside the hold claims those.
    fill_catalog(pg_database, QUERY_ROWS, prefix="big", org="big", expired=QUERY_ROWS // 10)
    now = database_time(pg_database)
    done = threading.Event()
    swept = {"deleted": 0, "sweeps": 0, "error": None}

    def sweep_beside() -> None:
        sweeper = build(settings, database=pg_database).sweeper
        try:
            while not done.is_set():
                counts = sweeper.sweep()
                swept["deleted"] += counts.deleted
                swept["sweeps"] += 1
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            swept["error"] = repr(error)

    beside = threading.Thread(target=sweep_beside)
    beside.start()
    time.sleep(0.5)  # the sweep is under way when the hold starts
    started = time.perf_counter()
    placed = engine.catalog.set_hold(held=True, reason="litigation", org="big", case="big-case",
                                     created_after=now - timedelta(days=2), created_before=now, mime="image/*",
                                     actor="bench")
    seconds = time.perf_counter() - started
    done.set()
    beside.join()
    with pg_database.engine.connect() as connection:
        members = connection.execute(text("SELECT count(*) FROM hold_items")).scalar()
        lost = connection.execute(text("SELECT count(*) FROM hold_items h JOIN media_items m ON m.id = h.item_id "
                                       "WHERE m.state <> 'active' OR m.held_at IS NULL")).scalar()
        claimed_first = connection.execute(text("SELECT count(*) FROM media_items WHERE state <> 'active'")).scalar()
        unaccounted = connection.execute(text(
            "SELECT count(*) FROM media_items m WHERE m.state = 'active' AND NOT EXISTS "
            "(SELECT 1 FROM hold_items h WHERE h.item_id = m.id)")).scalar()
    table(f"a hold by query over {QUERY_ROWS:,} matching items, a sweep beside it; PostgreSQL; {machine()}",
          ("figure", "value"),
          [("placement (one transaction)", f"{seconds:.1f} s"),
           ("items the hold holds", f"{placed.items:,}"),
           ("claimed by the sweep before the hold reached them", f"{claimed_first:,}"),
           ("sweeps beside it / items they deleted", f"{swept['sweeps']} / {swept['deleted']:,}"),
           ("held items deleted or unheld", f"**{lost}**"),
           ("matching items neither held nor claimed", f"**{unaccounted}**")])
    engine.close()
    assert swept["error"] is None and swept["sweeps"] > 0
    assert placed.items == members and lost == 0 and unaccounted == 0
    assert members + claimed_first == QUERY_ROWS
