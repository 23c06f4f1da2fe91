"""The org index holds an org's live rows only (migration 0014): a tombstone leaves no entry in it, and every
statement that selects an org's items reads it, on SQLite and PostgreSQL. Its generic plans on PostgreSQL are
held in tests/integration/test_plans.py."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event, text

from tests.factories import seed_items, seed_org, states, vacuum_analyze

ORG_INDEX = "ix_media_items_live_org_id_state"
# A statement that selects media_items rows by org: SQLAlchemy's `media_items.org_id = ...` or a claim's `c.org_id = ...`.
BY_ORG = re.compile(r"\b(media_items|c)\.org_id = ")


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


def claim_unfinished(catalog, media_id: str) -> None:
    """Leave `media_id` claimed and not finished, as a worker that died mid-batch leaves it."""
    with catalog.db.transaction() as session:
        session.execute(text("UPDATE media_items SET state = 'deleting', deletion_reason = 'ttl', claim_token = 'x', "
                             "claimed_at = CURRENT_TIMESTAMP, lease_until = CURRENT_TIMESTAMP WHERE id = :id"), {"id": media_id})


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_the_tombstones_a_sweep_and_an_org_purge_write_leave_no_entry_in_the_org_index(catalog, acme, media_root):
    """300 expired and 200 fresh items in acme, 100 fresh in another org: a sweep tombstones the 300 (one
    transaction a batch), an org purge of the other org tombstones its 100 (claim, then finalize); after a vacuum
    the org index counts the 200 live rows alone, while the primary key still counts all 600."""
    seed_org(catalog.db, "other")
    seed_items(catalog.db, media_root, acme, 300, prefix="due")
    seed_items(catalog.db, media_root, acme, 200, prefix="fresh", expired=False)
    seed_items(catalog.db, media_root, "other", 100, prefix="theirs", expired=False)
    assert catalog.sweeper.sweep().deleted == 300
    assert catalog.purge(org="other", actor="test").counts.deleted == 100
    vacuum_analyze(catalog.db)
    with catalog.db.transaction() as session:
        tuples = dict(session.execute(text(
            "SELECT relname, reltuples::bigint FROM pg_class WHERE relname IN (:org_index, 'pk_media_items') "
            "AND relnamespace = current_schema()::regnamespace"), {"org_index": ORG_INDEX}).all())
    assert tuples == {ORG_INDEX: 200, "pk_media_items": 600}


def test_org_show_counts_the_orgs_live_items_by_state_and_leaves_tombstones_out(catalog, acme, media_root):
    """Two expired items swept to tombstones, one claimed and unfinished, three active: org show counts three
    active and one deleting, and names no tombstone count (tombstones have no index by org)."""
    seed_items(catalog.db, media_root, acme, 2, prefix="due")
    assert catalog.sweeper.sweep().deleted == 2
    fresh = seed_items(catalog.db, media_root, acme, 4, prefix="fresh", expired=False, size=10)
    claim_unfinished(catalog, fresh[0])
    shown = catalog.show_org(acme).to_dict()
    assert (shown["items"], shown["active_bytes"]) == ({"active": 3, "deleting": 1}, 30)


def test_an_org_purge_counts_the_orgs_claimed_items_as_already_gone_and_reads_none_of_its_tombstones(catalog, acme, media_root):
    """Three tombstones, one claimed and unfinished, four active items: an org purge's dry run finds four eligible
    and one already gone (the claimed one); the tombstones are not among what it read."""
    seed_items(catalog.db, media_root, acme, 3, prefix="due")
    assert catalog.sweeper.sweep().deleted == 3
    fresh = seed_items(catalog.db, media_root, acme, 5, prefix="fresh", expired=False)
    claim_unfinished(catalog, fresh[0])
    summary = catalog.purge(org=acme, dry_run=True, actor="test")
    assert (summary.eligible, summary.already_gone, summary.held_skipped) == (4, 1, 0)
    assert sorted(summary.would_delete) == sorted(fresh[1:])
    by_name = catalog.purge(ids=["due-0", *fresh], dry_run=True, actor="test")  # by IDs: tombstones named are counted
    assert (by_name.eligible, by_name.already_gone) == (4, 2)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_sqlite_reads_an_orgs_items_by_the_org_index_in_every_org_statement(catalog, acme, media_root):
    """org show, a retention preview, org set rescheduling, an org hold and release, an org purge (dry run and real):
    every statement among them that selects media_items by org is planned by SQLite on the org index (which it uses
    only when the query spells the index's predicate)."""
    seed_items(catalog.db, media_root, acme, 3, prefix="due")
    assert catalog.sweeper.sweep().deleted == 3
    seed_items(catalog.db, media_root, acme, 5, prefix="fresh", expired=False)
    seen: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _executemany):
        if "media_items" in statement and BY_ORG.search(statement):
            seen.append((statement, parameters))

    event.listen(catalog.db.engine, "before_cursor_execute", record)
    try:
        catalog.show_org(acme)
        catalog.preview_retention(acme, "7d")
        catalog.set_org(acme, "31d", actor="test")
        catalog.set_hold(held=True, reason="case 9", org=acme, actor="test")
        catalog.set_hold(held=False, reason="case 9 closed", org=acme, actor="test")
        catalog.purge(org=acme, dry_run=True, actor="test")
        assert catalog.purge(org=acme, actor="test").counts.deleted == 5
    finally:
        event.remove(catalog.db.engine, "before_cursor_execute", record)

    assert len({statement for statement, _ in seen}) >= 7, seen
    raw = catalog.db.engine.raw_connection()
    try:
        elsewhere = []
        for statement, parameters in seen:
            plan = " ".join(row[-1] for row in raw.cursor().execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
            if ORG_INDEX not in plan:
                elsewhere.append(f"{plan} <- {' '.join(statement.split())[:200]}")
    finally:
        raw.close()
    assert elsewhere == [], "\n".join(elsewhere)
    assert set(states(catalog, [f"fresh-{n}" for n in range(5)]).values()) == {"deleted"}
