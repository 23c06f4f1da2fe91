"""The `media_items` row predicates, defined once.

Each predicate is SQL text with a `{c}` column prefix: the partial indexes (`worker/models.py`) are
built on the bare text, the claims qualify it with their alias, and the counts read it as a Core
fragment. Queries that spell a partial index's predicate exactly as the index does are the ones both
planners match to it (never `state = :param`: a generic plan cannot know the value). Migrations keep
their own literal SQL: a migration is history.

This module imports nothing from the rest of the package: `worker/models.py` reads it while it
defines the indexes.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, text
from sqlalchemy.sql.elements import TextClause

# Active and held neither itself nor through its org: what a sweep may claim once it expired.
CLAIMABLE = "{c}state = 'active' AND {c}held_at IS NULL AND NOT {c}org_held"
# Active but held, itself or through its org: what every sweep counts as held_skipped.
HELD = "{c}state = 'active' AND ({c}held_at IS NOT NULL OR {c}org_held)"
# Claimed for deletion: lookups answer 404, the blob may still exist.
DELETING = "{c}state = 'deleting'"
# Deleted: the blob is gone, the row answers 404 with its reason and time.
TOMBSTONE = "{c}state = 'deleted'"
# Not a tombstone (active, held or being deleted): the rows the org index holds (migration 0014). Every query
# that reads an org's rows wants these, so a tombstone leaves the index: writing one inserts nothing there,
# and at a billion rows the index holds live media only. An org's tombstones have no index by org.
LIVE = "{c}state <> 'deleted'"


def predicate(template: str, alias: str | None = None) -> str:
    """The predicate's SQL, its columns qualified with `alias` when given."""
    return template.format(c=f"{alias}." if alias else "")


def claimable() -> TextClause:
    return text(predicate(CLAIMABLE))


def held() -> TextClause:
    return text(predicate(HELD))


def deleting() -> TextClause:
    return text(predicate(DELETING))


def tombstone() -> TextClause:
    return text(predicate(TOMBSTONE))


def live() -> TextClause:
    return text(predicate(LIVE))


def org_live(items, org_id: str):
    """The org's rows that are not tombstones, spelled as the org index is (`org_id` first, then LIVE): what
    every org-scoped read and write selects, so both planners read that index, generic plans included."""
    return and_(items.c.org_id == org_id, live())


def due(items, now):
    """Claimable and expired by `now` (the database clock): what a sweep would claim."""
    return and_(claimable(), items.c.expires_at <= now)


def held_expired(items, now):
    """Expired but held: what a sweep leaves alone."""
    return and_(held(), items.c.expires_at <= now)


def not_gone_by_expiry(items, clock):
    """Rows a policy change may still act on: not expired by `clock` (the database's wall clock, read per row
    once the row is locked), or held (a held item was held before it expired, so no sweep ever picked it and
    its blob is there). An expired, unheld item is gone whatever its row says: it answers 404 from its
    expiry, and an expiry sweep on PostgreSQL deletes its blobs before it writes the row (one transaction), so
    a sweep killed in between leaves an active row whose blobs are gone. A hold, a longer retention or a rule
    that reached such a row would make it live again with nothing behind it; none does."""
    return or_(items.c.expires_at > clock, items.c.held_at.is_not(None), items.c.org_held)


def compactable(items, cutoff, now):
    """Tombstones deleted before `cutoff` (read by the tombstones' deletion-time index): what compaction
    removes. Except a `missing_blob` tombstone whose item has not expired by `now` (the database clock):
    its blob may come back, and reconcile keeps a returned blob until the expiry only while a row names it."""
    return and_(tombstone(), items.c.deleted_at < cutoff,
                or_(items.c.deletion_reason != "missing_blob", items.c.expires_at <= now))
