"""Every statement a long-lived process runs keeps an index plan when PostgreSQL plans it once for all
parameters: the way it plans a prepared statement after a few runs.

psycopg prepares a statement after `prepare_threshold` (5) runs on a connection, and PostgreSQL then
switches a prepared statement to its generic plan (planned without the parameters' values) once that
looks no dearer than the custom ones. A worker, the HTTP service or an upstream service importing the
catalog API runs the same statements for days, so each must be fine under its generic plan. Here every
statement is prepared at once (`prepare_threshold=0`), PostgreSQL is told to use generic plans always
(`plan_cache_mode=force_generic_plan`), and auto_explain hands back the plan of every statement executed
as a notice. On a catalog of 60,000 rows in 50 orgs (20,000 live, 40,000 tombstones; statistics fresh, not yet vacuumed, as an import
leaves it) no plan may read media_items by a sequential scan. Before the import's duplicate checks used one array parameter, `id IN (500 placeholders)
LIMIT 1` was planned as a sequential scan here (~300 ms a batch at 20,000 rows).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import event, text

from config.settings import load_settings
from tests.factories import bind_store, fill_catalog, make_file
from worker import items as items_sql
from worker import status
from worker.catalog.keyed_lookup import KeyedLookup
from worker.db import Database
from worker.db_async import ThreadedStatement
from worker.engine import build
from worker.tombstones import Tombstones

pytestmark = pytest.mark.postgres

ROWS = 20_000
# Tombstones beside the live rows, in the same orgs: a catalog that keeps its deletions (compaction after 30
# days) holds more tombstones than live media, and the org index holds none of them (migration 0014).
TOMBSTONES = 40_000
ORGS = 50
ORG_INDEX = "ix_media_items_live_org_id_state"
# Lines per manifest: as many IDs and keys as the import's duplicate checks ask about at once in a real
# import (a list of this many placeholders is what a generic plan turned into a sequential scan).
MANIFEST_LINES = 600


@pytest.fixture
def planned(pg_server_url) -> Iterator[tuple[Database, list[dict]]]:
    """A migrated catalog of ROWS rows in a schema of its own, on connections that prepare every statement,
    use generic plans only and report each executed plan; yields the database and the plans seen."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = Database(pg_server_url)
    with admin.engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    setup = Database(f"{pg_server_url}?options=-csearch_path%3D{schema}")
    from worker import schema as migrations

    migrations.upgrade(setup)
    # Analyzed but not vacuumed: a catalog being imported into, before autovacuum came by. Without a
    # visibility map an index-only scan costs what an index scan does, which is where a list of
    # placeholders tipped the generic plan over to a sequential scan.
    fill_catalog(setup, TOMBSTONES, prefix="gone", state="deleted", orgs=ORGS, vacuum=False)
    fill_catalog(setup, ROWS, prefix="seed", expired=500, orgs=ORGS, vacuum=False)
    setup.dispose()

    plans: list[dict] = []
    db = Database(pg_server_url, connect_args={
        "prepare_threshold": 0,
        "options": f"-csearch_path={schema} -cplan_cache_mode=force_generic_plan",
    })

    @event.listens_for(db.engine, "connect")
    def _explain_everything(dbapi_connection, _record):
        def notice(diagnostic):
            message = diagnostic.message_primary or ""
            if "plan:" in message:
                plans.append(json.loads(message.split("plan:", 1)[1]))

        dbapi_connection.add_notice_handler(notice)
        with dbapi_connection.cursor() as cursor:
            for statement in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                              "SET auto_explain.log_level = notice", "SET auto_explain.log_format = json",
                              "SET client_min_messages = notice"):
                cursor.execute(statement)
        dbapi_connection.commit()

    try:
        yield db, plans
    finally:
        db.dispose()
        with admin.engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def index_names(plan: dict) -> Iterator[str]:
    """Indexes the plan reads (index, index-only and bitmap index scans)."""
    node = plan.get("Plan", plan)
    if "Index Name" in node:
        yield node["Index Name"]
    for child in node.get("Plans", []):
        yield from index_names(child)


def sequential_scans(plan: dict) -> Iterator[str]:
    """Relations the plan reads by a sequential scan."""
    node = plan.get("Plan", plan)
    if node.get("Node Type") == "Seq Scan":
        yield node.get("Relation Name")
    for child in node.get("Plans", []):
        yield from sequential_scans(child)


def test_every_statement_of_a_long_lived_process_keeps_an_index_plan_under_generic_planning(planned, tmp_path):
    """Register (one file, a manifest of keys), look up, hold and release, purge, the expiry watch's probe, a
    sweep (claims, finalize), the fleet status a scrape reads, API-key checks, the HTTP lookup's one statement,
    tombstone compaction and its dry run: each run more times than psycopg's prepare threshold, none planned as a sequential scan of
    media_items."""
    db, plans = planned
    media = tmp_path / "media"
    media.mkdir()
    settings = load_settings(data_dir=tmp_path / "data", database_url=db.url, storage_url=media.as_uri(),
                             sweep_batch_size=100)
    engine = build(settings, database=db)
    bind_store(engine)  # its rows have no blobs, which a real binding rightly refuses
    catalog, sweeper = engine.catalog, engine.sweeper
    tombstones = Tombstones(db)
    org = "bench-7"
    token = catalog.api_keys.create(org, name="plans", actor="test").token
    keyed = KeyedLookup(catalog.lookups, ThreadedStatement(db, items_sql.keyed_lookup_sql(db.sql)))
    uploads = tmp_path / "uploads"
    manifest = tmp_path / "m.jsonl"
    for round_number in range(7):  # above psycopg's prepare threshold of 5
        item = catalog.register(org=org, file=make_file(uploads), media_id=f"r{round_number}", ttl="1h")
        keys = [f"legacy/{round_number}/{n}" for n in range(MANIFEST_LINES)]
        for key in keys:
            (media / key).parent.mkdir(parents=True, exist_ok=True)
            (media / key).write_bytes(b"x")
        manifest.write_text("".join(json.dumps({"org": org, "id": f"m{round_number}-{n}", "key": key}) + "\n"
                                    for n, key in enumerate(keys)))
        catalog.register_manifest(manifest)
        catalog.find(item.id)
        catalog.lookups.find_for_org(org, f"seed-{round_number}")
        catalog.api_keys.authenticate(token)
        # The HTTP lookup's one statement (key, item, variants, clock), on the engine's connections here so that
        # its plans are reported like the others'.
        asyncio.run(keyed.answer(token, f"seed-{round_number}"))
        asyncio.run(keyed.answer(token, item.id))
        catalog.set_hold(held=True, reason="case 7", ids=[item.id], actor="test")
        catalog.set_hold(held=False, reason="case 7 closed", ids=[item.id], actor="test")
        catalog.purge(ids=[f"m{round_number}-0"], actor="test")
        sweeper.seconds_until_due()
        sweeper.sweep(limit=50)
        status.fleet_status(db)
        status.due_count(db)
        tombstones.compact(older_than=timedelta(days=30), actor="test", dry_run=True)
        tombstones.compact(older_than=timedelta(days=30), actor="test")
    engine.store.close()

    assert len(plans) > 200, "auto_explain reported too few plans: is it loaded?"
    assert any("AS asked" in plan["Query Text"] for plan in plans), "the HTTP lookup's statement was not planned"
    scans = sorted({" ".join(plan["Query Text"].split())[:400] for plan in plans if "media_items" in set(sequential_scans(plan))})
    assert scans == [], f"{len(scans)} statements read media_items by a sequential scan:\n" + "\n".join(scans)


# A statement that selects media_items rows by org: SQLAlchemy's `media_items.org_id = ...` or a claim's `c.org_id = ...`.
BY_ORG = re.compile(r"\b(media_items|c)\.org_id = ")


def test_every_statement_that_reads_an_orgs_items_reads_the_org_index_of_live_rows_under_generic_planning(planned, tmp_path):
    """org show (live counts, active bytes), a retention preview, org set rescheduling the org's items, an org hold
    and its release (the org_held mirror), an org purge's dry run and the purge itself (its candidates and its claims):
    each run for seven orgs, and every statement among them that selects media_items by org reads the org index of
    live rows, none a sequential scan nor another index alone."""
    db, plans = planned
    media = tmp_path / "media"
    media.mkdir()
    settings = load_settings(data_dir=tmp_path / "data", database_url=db.url, storage_url=media.as_uri(),
                             sweep_batch_size=100)
    engine = build(settings, database=db)
    bind_store(engine)  # its rows have no blobs, which a real binding rightly refuses
    catalog = engine.catalog
    purged = 0
    for round_number in range(7):  # above psycopg's prepare threshold of 5
        org = f"bench-{10 + round_number}"
        assert catalog.show_org(org).items["active"] == ROWS // ORGS
        catalog.preview_retention(org, "7d")
        catalog.set_org(org, "31d", actor="test")
        catalog.set_hold(held=True, reason="case 9", org=org, actor="test")
        catalog.set_hold(held=False, reason="case 9 closed", org=org, actor="test")
        assert catalog.purge(org=org, dry_run=True, actor="test").eligible == ROWS // ORGS
        purged += catalog.purge(org=org, actor="test").counts.deleted
    engine.store.close()
    assert purged == 7 * (ROWS // ORGS)

    by_org: dict[str, set[str]] = {}
    for plan in plans:
        query = " ".join(plan["Query Text"].split())
        if "media_items" in query and BY_ORG.search(query):
            by_org.setdefault(query[:300], set()).update(index_names(plan))
    # Counts, bytes, preview, rewrite, mirror, purge candidates, org claim: seven statements at least.
    assert len(by_org) >= 7, sorted(by_org)
    elsewhere = sorted(query for query, indexes in by_org.items() if ORG_INDEX not in indexes)
    assert elsewhere == [], f"{len(elsewhere)} statements select an org's items without the org index:\n" + "\n".join(elsewhere)
