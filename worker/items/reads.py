"""The reads of `media_items`: each takes a session (the caller's transaction) and plain values, and
returns rows, counts or sums. What to make of them stays with the caller."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, func, or_, select

from worker import models
from worker.db import db_now
from worker.dialect import Dialect
from worker.items.predicates import claimable, deleting, due, held, held_expired, tombstone

# -- the sweep: what is due, what it leaves alone -------------------------------------------------------


def next_due(session) -> tuple[datetime, datetime | None, datetime | None]:
    """The database's time, the earliest expiry of a claimable item and the earliest lease of a claimed
    one (None where there is none): two reads of the first entry of the claims' own partial indexes."""
    items = models.MediaItem.__table__
    next_expiry = select(func.min(items.c.expires_at)).where(claimable()).scalar_subquery()
    next_lease = select(func.min(items.c.lease_until)).where(deleting()).scalar_subquery()
    now, expiry, lease = session.execute(select(db_now(), next_expiry, next_lease)).one()
    return now, expiry, lease


def held_expired_count(session) -> int:
    """Expired active items a sweep leaves alone because they or their org are on hold."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).where(held_expired(items, db_now()))) or 0


def due_preview(session, shown: int) -> tuple[int, int, list]:
    """What a sweep would claim now, without claiming it (expired claimable items and claims whose lease
    ran out): how many, their bytes, and the first `shown` of them by expiry (`id`, `org_id`,
    `storage_key`, `size_bytes`, `expires_at`, `ttl_seconds`)."""
    items = models.MediaItem.__table__
    now_due = or_(
        due(items, db_now()),
        and_(items.c.state == models.State.DELETING.value, items.c.lease_until <= db_now()),
    )
    total, total_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(items.c.size_bytes), 0)).where(now_due)
    ).one()
    rows = session.execute(
        select(items.c.id, items.c.org_id, items.c.storage_key, items.c.size_bytes, items.c.expires_at, items.c.ttl_seconds)
        .where(now_due)
        .order_by(items.c.expires_at)
        .limit(shown)
    ).all()
    return total, total_bytes, rows


# -- fleet status: the backlog, what is stuck, how late deletions went ---------------------------------
# The predicates as their partial indexes spell them (not `state = :param`), so even a generic plan
# (a long-lived exporter prepares these) reads the indexes.


def due_count(session) -> int:
    """Expired, unheld, active items: what a sweep would claim now (index range scan on expiry)."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).where(due(items, db_now()))) or 0


def due_totals(session) -> tuple[int, int]:
    """How many items a sweep would claim now, and their bytes."""
    items = models.MediaItem.__table__
    return tuple(session.execute(
        select(func.count(), func.coalesce(func.sum(items.c.size_bytes), 0)).where(due(items, db_now()))
    ).one())


def deleting_count(session) -> int:
    """Items claimed and not finalized yet."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).select_from(items).where(deleting())) or 0


def oldest_overdue(session):
    """The item due the longest (`id`, `expires_at`): due and unclaimed, or claimed and not finished;
    None when there is none."""
    items = models.MediaItem.__table__
    # The oldest of the two index heads: an OR of both predicates would read neither index.
    heads = [session.execute(select(items.c.id, items.c.expires_at).where(where).order_by(items.c.expires_at).limit(1)).first()
             for where in (due(items, db_now()), deleting())]
    return min((head for head in heads if head is not None), key=lambda head: head.expires_at, default=None)


def stuck_claims(session, listed: int) -> tuple[int, list]:
    """Claims whose delete failed at least once, or whose lease ran out with nobody taking them over:
    how many, and the first `listed` (`id`, `attempts`, `last_error`, `lease_until`, `claimed_at`), most
    attempts first."""
    items = models.MediaItem.__table__
    stuck = deleting() & or_(items.c.attempts > 0, items.c.lease_until < db_now())
    count = session.scalar(select(func.count()).select_from(items).where(stuck)) or 0
    rows = session.execute(
        select(items.c.id, items.c.attempts, items.c.last_error, items.c.lease_until, items.c.claimed_at)
        .where(stuck)
        .order_by(items.c.attempts.desc(), items.c.claimed_at)
        .limit(listed)
    ).all()
    return count, rows


def missing_blob_counts(session) -> tuple[int, int]:
    """Active items whose blob reconcile found missing, and how many of them are held (read by the
    partial index on missing_since)."""
    items = models.MediaItem.__table__
    missing = items.c.missing_since.is_not(None) & (items.c.state == models.State.ACTIVE.value)
    count = session.scalar(select(func.count()).where(missing)) or 0
    held_count = session.scalar(select(func.count()).where(missing, held())) or 0
    return count, held_count


def recent_deletions(session, window_seconds: int, reasons, limit: int) -> list:
    """`expires_at` and `deleted_at` of the latest tombstones deleted for `reasons` within the last
    `window_seconds` (database clock), at most `limit`, newest first: read by the tombstones'
    deletion-time index."""
    items = models.MediaItem.__table__
    return session.execute(
        select(items.c.expires_at, items.c.deleted_at)
        .where(tombstone(), items.c.deleted_at >= db_now(-window_seconds), items.c.deletion_reason.in_(reasons))
        .order_by(items.c.deleted_at.desc())
        .limit(limit)
    ).all()


# -- registration: what is taken already -------------------------------------------------------------


def first_taken(session, dialect: Dialect, column: str, values: list[str]) -> str | None:
    """One of `values` already in `column` (`id` or `storage_key`) of any row, tombstones included, or None.
    As one array parameter on PostgreSQL: a list of placeholders, prepared and planned generically
    after a few runs, made the planner pick a scan of the whole table."""
    if not values:
        return None
    found = models.MediaItem.__table__.c[column]
    return session.execute(select(found).where(dialect.id_in(found, values)).limit(1)).scalar()


def existing(session, dialect: Dialect, column: str, values: list[str], *wanted: str) -> list:
    """The rows whose `column` is one of `values`: the `wanted` columns (by name), else every column."""
    if not values:
        return []
    table = models.MediaItem.__table__
    return session.execute(select(*((table.c[name] for name in wanted) if wanted else (table,)))
                           .where(dialect.id_in(table.c[column], values))).all()
