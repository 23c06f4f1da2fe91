"""Retention rules by content type: what they cost the claim (nothing: it reads only `expires_at`) and what a rule
change costs (one UPDATE of the items it moves, in the transaction that changes the rule).

    .venv/bin/pytest tests/bench/bench_rules.py -s -o addopts=-ra -o python_files='bench_*.py'

Target (issue #23, DESIGN invariant 7): a claim with 100 rules in the catalog costs at most 1.2x one with none.
A rule change is timed over BENCH_RULE_ITEMS items of one type (200,000 by default) in an org of three times as
many TTL-less items, beside `org set --retention` over the same count (its baseline: the same rewrite, selected
by org instead of by content type).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
from sqlalchemy import text

from config.settings import load_settings
from tests.bench.support import machine, table
from tests.factories import fill_catalog, vacuum_analyze
from worker.engine import build

pytestmark = pytest.mark.postgres

AFFECTED = int(os.environ.get("BENCH_RULE_ITEMS", "200000"))
DUE = 30_000
CLAIMS = 20
BATCH = 1000
RULES = 100
TARGET_RATIO = 1.2


def claim_median(sweeper, db) -> float:
    times = []
    for _ in range(CLAIMS):
        started = time.perf_counter()
        assert len(sweeper.claim_expired(BATCH)) == BATCH
        times.append(time.perf_counter() - started)
    with db.engine.begin() as connection:  # give the rows back for the next run
        connection.execute(text("UPDATE media_items SET state = 'active', claim_token = NULL, claimed_at = NULL, "
                                "lease_until = NULL, deletion_reason = NULL WHERE state = 'deleting'"))
    vacuum_analyze(db)
    return statistics.median(times)


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def test_rules_cost_the_claim_nothing_and_a_rule_change_costs_one_rewrite_of_the_items_it_moves(pg_database, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url, storage_url=(tmp_path / "media").as_uri())
    engine = build(settings, database=pg_database)
    catalog, sweeper = engine.catalog, engine.sweeper
    # Three content types, AFFECTED items each, TTL-less (rules apply to them); DUE of them expired.
    fill_catalog(pg_database, 3 * AFFECTED, prefix="row", expired=DUE, vacuum=False)
    with pg_database.engine.begin() as connection:
        connection.execute(text("UPDATE media_items SET ttl_seconds = NULL, mime_type = CASE "
                                "WHEN substr(id, 5)::bigint % 3 = 0 THEN 'image/png' "
                                "WHEN substr(id, 5)::bigint % 3 = 1 THEN 'image/jpeg' ELSE 'application/pdf' END"))
    vacuum_analyze(pg_database)

    claim_median(sweeper, pg_database)  # warm-up: caches and the visibility map settle
    none = claim_median(sweeper, pg_database)
    for number in range(RULES):  # 100 rules in the catalog, of types no item has: the claim is all that changes
        catalog.set_org(f"ruled-{number % 10}", "90d")
        catalog.rules.set(f"ruled-{number % 10}", f"x-type-{number}/*", "30d")
    with_rules = claim_median(sweeper, pg_database)
    with pg_database.engine.begin() as connection:
        connection.execute(text("DELETE FROM retention_rules"))
    none_again = claim_median(sweeper, pg_database)
    baseline = (none + none_again) / 2

    preview, _ = timed(lambda: catalog.rules.set("bench", "image/png", "7d", dry_run=True))
    png, png_rule = timed(lambda: catalog.rules.set("bench", "image/png", "7d"))
    image, image_rule = timed(lambda: catalog.rules.set("bench", "image/*", "14d"))  # the jpegs: png has its own rule
    noop, noop_rule = timed(lambda: catalog.rules.set("bench", "image/png", "7d"))
    org, org_view = timed(lambda: catalog.set_org("bench", "30d"))  # the pdfs only: rules cover the rest
    removed, removed_rule = timed(lambda: catalog.rules.remove("bench", "image/png"))  # png falls back to image/*
    assert png_rule.items_rescheduled == image_rule.items_rescheduled == removed_rule.items_rescheduled == AFFECTED
    assert noop_rule.items_rescheduled == 0

    table(f"claim of one batch ({BATCH:,} of {DUE:,} due, {3 * AFFECTED:,} rows), PostgreSQL, median of {CLAIMS}; {machine()}",
          ("catalog", "claim", "ratio"),
          [("no rules (baseline: mean of the runs before and after)", f"{none * 1000:.1f} / {none_again * 1000:.1f} ms", "1.00"),
           (f"{RULES} rules", f"{with_rules * 1000:.1f} ms", f"**{with_rules / baseline:.2f}** (target <= {TARGET_RATIO})")])
    table(f"a retention change over {AFFECTED:,} of the org's {3 * AFFECTED:,} TTL-less items (one transaction)",
          ("change", "items rescheduled", "time"),
          [("`org rule set bench --mime image/png --retention 7d --dry-run` (selecting them: the preview)", "0", f"{preview:.2f} s"),
           ("`org rule set bench --mime image/png --retention 7d`", f"{AFFECTED:,}", f"{png:.2f} s"),
           ("`org rule set bench --mime image/* --retention 14d` (jpegs; png has its own rule)", f"{AFFECTED:,}", f"{image:.2f} s"),
           ("`org rule set bench --mime image/png --retention 7d` again (no-op)", "0", f"{noop * 1000:.1f} ms"),
           ("`org set bench --retention 30d` (pdfs: the items no rule covers; baseline)", "(pdfs)", f"{org:.2f} s"),
           ("`org rule rm bench --mime image/png` (png falls back to image/*)", f"{AFFECTED:,}", f"{removed:.2f} s")])
    assert with_rules / baseline <= TARGET_RATIO
