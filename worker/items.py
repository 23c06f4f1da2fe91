"""The `media_items` predicates, defined once, and the claim built on them.

Each predicate is SQL text with a `{c}` column prefix: the partial indexes (`worker/models.py`) are
built on the bare text, the claims qualify it with their alias, and the counts, the dry run and
`status` read it as a Core fragment. Queries that spell a partial index's predicate exactly as the
index does are the ones both planners match to it. Migrations keep their own literal SQL: a
migration is history.
"""

from __future__ import annotations

from sqlalchemy import and_, select, table as _table, column as _column, text
from sqlalchemy.sql.elements import TextClause

from worker.dialect import Dialect

# Active and held neither itself nor through its org: what a sweep may claim once it expired.
CLAIMABLE = "{c}state = 'active' AND {c}held_at IS NULL AND NOT {c}org_held"
# Active but held, itself or through its org: what every sweep counts as held_skipped.
HELD = "{c}state = 'active' AND ({c}held_at IS NOT NULL OR {c}org_held)"
# Claimed for deletion: lookups answer 404, the blob may still exist.
DELETING = "{c}state = 'deleting'"
# Deleted: the blob is gone, the row answers 404 with its reason and time.
TOMBSTONE = "{c}state = 'deleted'"


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


def due(items, now):
    """Claimable and expired by `now` (the database clock): what a sweep would claim."""
    return and_(claimable(), items.c.expires_at <= now)


def held_expired(items, now):
    """Expired but held: what a sweep leaves alone."""
    return and_(held(), items.c.expires_at <= now)


# -- registration ----------------------------------------------------------------------------------

_ITEMS = _table("media_items", _column("id"), _column("storage_key"))


def first_taken(session, dialect: Dialect, column: str, values: list[str]) -> str | None:
    """One of `values` already in `column` (`id` or `storage_key`) of any row, tombstones included, or None.
    As one array parameter on PostgreSQL: a list of placeholders, prepared and planned generically
    after a few runs, made the planner pick a scan of the whole table."""
    if not values:
        return None
    found = _ITEMS.c[column]
    return session.execute(select(found).where(dialect.id_in(found, values)).limit(1)).scalar()


def existing(session, dialect: Dialect, column: str, values: list[str], *wanted) -> list:
    """The rows whose `column` is one of `values` (with the `wanted` columns of media_items)."""
    from worker.models import MediaItem

    if not values:
        return []
    table = MediaItem.__table__
    return session.execute(select(*(wanted or (table,))).where(dialect.id_in(table.c[column], values))).all()


def insert_rows(session, dialect: Dialect, rows: list[dict]) -> None:
    """New active items, in the session's transaction (by COPY on PostgreSQL)."""
    from worker.models import MediaItem

    dialect.insert_rows(session, MediaItem.__table__, rows)


# -- the claim -------------------------------------------------------------------------------------

# Evaluated on the updated row (`m` on PostgreSQL, the bare table on SQLite, which has no UPDATE alias).
REASON_BY_TTL = "CASE WHEN {m}ttl_seconds IS NULL THEN 'retention' ELSE 'ttl' END"

# The claim, one UPDATE ... RETURNING per dialect. PostgreSQL picks the rows FOR UPDATE (SKIP LOCKED
# for sweeps) so concurrent sweepers take disjoint batches; SQLite has one writer at a time
# (BEGIN IMMEDIATE), so the claim is exclusive without row locks.
_CLAIM = {
    "postgresql": """
UPDATE media_items AS m
SET state = 'deleting',
    deletion_reason = COALESCE(m.deletion_reason, {reason}),
    claim_token = :token,
    claimed_at = COALESCE(m.claimed_at, {now}),
    lease_until = {lease}
FROM (
    SELECT c.id FROM media_items AS c
    WHERE {where}
    ORDER BY {order} LIMIT :limit
    {lock}
) AS picked
WHERE m.id = picked.id
RETURNING m.id, m.storage_key, m.size_bytes, m.deletion_reason, m.attempts
""",
    "sqlite": """
UPDATE media_items
SET state = 'deleting',
    deletion_reason = COALESCE(deletion_reason, {reason}),
    claim_token = :token,
    claimed_at = COALESCE(claimed_at, {now}),
    lease_until = {lease}
WHERE id IN (
    SELECT c.id FROM media_items AS c
    WHERE {where}
    ORDER BY {order} LIMIT :limit
)
RETURNING id, storage_key, size_bytes, deletion_reason, attempts
""",
}


def claim_sql(dialect: Dialect, *, where: str, order: str, reason: str, now: str, lease: str, skip_locked: bool) -> str:
    """The claim's SQL for `dialect`: rows of `media_items AS c` matching `where`, in `order`, moved to
    `deleting` with `reason` (may name `{m}` columns of the updated row) and a lease until `lease`."""
    return _CLAIM[dialect.name].format(
        where=where.format(now=now),
        order=order,
        reason=reason.format(m=dialect.update_alias("m")),
        now=now,
        lease=lease,
        lock=dialect.row_lock(skip_locked=skip_locked),
    )
