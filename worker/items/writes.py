"""The writes of `media_items`: each takes a session (the caller's transaction) and plain values, and
returns what the caller needs of the rows it changed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from sqlalchemy import BigInteger, Integer, and_, bindparam, case, delete, func, or_, select, update

from worker import models
from worker.db import db_clock, db_now, plus_seconds
from worker.dialect import Dialect
from worker.items.holds import apply_future_holds
from worker.items.predicates import claimable, compactable, not_gone_by_expiry, org_live

# -- registration --------------------------------------------------------------------------------------


def insert_rows(session, dialect: Dialect, rows: list[dict]) -> None:
    """New active items, in the session's transaction (by COPY on PostgreSQL), held at once by every open
    `--include-future` query hold of their org they match. Every insert path (register, manifests, adopt)
    comes through here, under a share lock on its orgs' rows (see `apply_future_holds`)."""
    dialect.insert_rows(session, models.MediaItem.__table__, rows)
    apply_future_holds(session, dialect, rows)


def insert_variants(session, dialect: Dialect, rows: list[dict]) -> None:
    """New variants of items (`storage_key`, `item_id`, `size_bytes`, `mime_type`, `sha256`), in the session's
    transaction, after their items' rows; their items are marked `has_variants` in the same transaction, which
    is what tells the sweep's claim to read an item's variants (every variant insert goes through here)."""
    if not rows:
        return
    dialect.insert_rows(session, models.MediaVariant.__table__, rows)
    items = models.MediaItem.__table__
    session.execute(update(items).where(dialect.id_in(items.c.id, sorted({row["item_id"] for row in rows})),
                                        items.c.has_variants.is_(False)).values(has_variants=True))


# -- finalize: a claimed batch's outcome, only on rows still under its claim token ---------------------


class Tombstoned(NamedTuple):
    """What a finalize tombstoned of one org for one deletion reason."""

    org_id: str
    reason: str
    count: int
    size_bytes: int
    lateness: list[float]  # each row's seconds from its expiry to its deletion, by the database's clock


def tombstone_claimed(session, dialect: Dialect, token: str, ids: list[str]) -> list[Tombstoned]:
    """Tombstone the rows of `ids` still claimed under `token` (deleted now; lease, token and error
    cleared). Returns, per org and deletion reason, how many rows it changed, their bytes and each one's
    lateness (computed by the database: one float instead of two timestamps to convert). On PostgreSQL the
    database groups them (the UPDATE's RETURNING feeds a GROUP BY, the lateness comes as one float array):
    a thousand result rows built and tallied in Python were more than half a finalize's CPU."""
    items = models.MediaItem.__table__
    State = models.State
    changed = (
        update(items)
        .where(dialect.id_in(items.c.id, ids), items.c.claim_token == token, items.c.state == State.DELETING.value)
        .values(state=State.DELETED.value, deleted_at=db_now(), lease_until=None, claim_token=None, last_error=None,
                locked_until=None, lock_reason=None)
    )
    return _tombstoned(session, dialect, changed)


def tombstone_locked(session, dialect: Dialect, ids: list[str]) -> list[Tombstoned]:
    """The one-transaction sweep's tombstones: the rows of `ids`, which this transaction locked (`Claims.lock_*`)
    and whose blobs it deleted, become `deleted` in one UPDATE, their only write. `deleted_at` is the wall clock
    now (`clock_timestamp()`: the blobs are gone by now; the transaction's `now()` is when it began, before the
    store was asked), `claimed_at` the transaction's `now()` (the clock the pick was cut off by) unless an
    earlier claim set it, the reason the one the pick read. Returns what `tombstone_claimed` returns."""
    items = models.MediaItem.__table__
    State = models.State
    changed = (
        update(items)
        .where(dialect.id_in(items.c.id, ids), items.c.state != State.DELETED.value)
        .values(state=State.DELETED.value, deletion_reason=func.coalesce(items.c.deletion_reason, _reason_by_ttl(items)),
                claimed_at=func.coalesce(items.c.claimed_at, db_now()), deleted_at=db_clock(), lease_until=None,
                claim_token=None, last_error=None, locked_until=None, lock_reason=None)
    )
    return _tombstoned(session, dialect, changed)


def _reason_by_ttl(items):
    """`ttl` for an item with its own TTL, `retention` otherwise: why an expired item goes."""
    return case((items.c.ttl_seconds.is_(None), models.Reason.RETENTION.value), else_=models.Reason.TTL.value)


def _tombstoned(session, dialect: Dialect, changed) -> list[Tombstoned]:
    """Run the tombstoning UPDATE `changed`; its rows grouped by org and reason (see `tombstone_claimed`)."""
    items = models.MediaItem.__table__
    changed = changed.returning(items.c.org_id, items.c.deletion_reason, items.c.size_bytes,
                                dialect.seconds_between(items.c.deleted_at, items.c.expires_at).label("late"))
    if dialect.postgresql:
        done = changed.cte("done")
        return [Tombstoned(*row) for row in session.execute(
            select(done.c.org_id, done.c.deletion_reason, func.count(), func.sum(done.c.size_bytes).cast(BigInteger),
                   func.array_agg(done.c.late))
            .group_by(done.c.org_id, done.c.deletion_reason))]
    size_bytes: Counter[tuple[str, str]] = Counter()
    lateness: dict[tuple[str, str], list[float]] = {}
    for org_id, reason, size, late in session.execute(changed):
        size_bytes[org_id, reason] += size
        lateness.setdefault((org_id, reason), []).append(late)
    return [Tombstoned(org_id, reason, len(late), size_bytes[org_id, reason], late) for (org_id, reason), late in lateness.items()]


def fail_locked(session, token: str, failures: Iterable[tuple[str, str, int, str | None, object]]) -> None:
    """The one-transaction sweep's failed deletes, each `(id, error, retry_in_seconds, lock_reason, locked_until)`,
    on rows this transaction locked: they become `deleting` under `token` (so lookups keep answering 404 and
    the stale claim retries them) exactly as `lock_claimed` leaves a failed claim: one more attempt, the error,
    a lease `retry_in_seconds` from now (wall clock) and the store's lock, with the reason and `claimed_at` a
    tombstone would get."""
    items = models.MediaItem.__table__
    rows = [{"b_id": media_id, "b_error": error, "b_backoff": backoff, "b_reason": reason, "b_until": until}
            for media_id, error, backoff, reason, until in failures]
    if not rows:
        return
    session.execute(
        update(items)
        .where(items.c.id == bindparam("b_id"), items.c.state != models.State.DELETED.value)
        .values(
            state=models.State.DELETING.value,
            deletion_reason=func.coalesce(items.c.deletion_reason, _reason_by_ttl(items)),
            claimed_at=func.coalesce(items.c.claimed_at, db_now()),
            claim_token=token,
            attempts=items.c.attempts + 1,
            last_error=bindparam("b_error"),
            lease_until=plus_seconds(db_clock(), bindparam("b_backoff", type_=Integer)),
            lock_reason=bindparam("b_reason"),
            locked_until=bindparam("b_until", type_=items.c.locked_until.type),
        ),
        rows,
    )


def fail_claimed(session, failures: Iterable[tuple[str, str, str, int]]) -> None:
    """Failed deletes, each `(id, token, error, backoff_seconds)`, on rows still claimed under that token:
    one more attempt, the error, and the lease pushed out by the backoff (database clock). A lock recorded
    earlier is cleared: this failure is not one."""
    lock_claimed(session, [(media_id, token, error, backoff, None, None) for media_id, token, error, backoff in failures])


def lock_claimed(session, failures: Iterable[tuple[str, str, str, int, str | None, object]]) -> None:
    """Failed deletes, each `(id, token, error, retry_in_seconds, lock_reason, locked_until)`, on rows still
    claimed under that token: one more attempt, the error, the lease pushed out `retry_in_seconds` (database
    clock), and why the store refused (Object Lock: 'retention' until `locked_until`, or 'legal_hold'; None
    for an ordinary failure)."""
    items = models.MediaItem.__table__
    rows = [{"b_id": media_id, "b_token": token, "b_error": error, "b_backoff": backoff, "b_reason": reason,
             "b_until": until} for media_id, token, error, backoff, reason, until in failures]
    if not rows:
        return
    session.execute(
        update(items)
        .where(items.c.id == bindparam("b_id"), items.c.claim_token == bindparam("b_token"),
               items.c.state == models.State.DELETING.value)
        .values(
            attempts=items.c.attempts + 1,
            last_error=bindparam("b_error"),
            lease_until=plus_seconds(db_now(), bindparam("b_backoff", type_=Integer)),
            lock_reason=bindparam("b_reason"),
            locked_until=bindparam("b_until", type_=items.c.locked_until.type),
        ),
        rows,
    )


# -- holds and retention: what a hold or an org's new period writes on the rows ------------------------


def rewrite_expiry(session, org_id: str, retention_seconds: int, governed=None) -> int:
    """Reschedule the org's active TTL-less items to `created_at + retention_seconds` (exact on both
    databases), only those `governed` selects when given (`reads.governed_by`: the rows one retention
    rule, or the org's period, decides); returns how many. Never an item already gone by its expiry
    (`not_gone_by_expiry`, judged by the wall clock once the row is locked: after any sweep that held it)."""
    items = models.MediaItem.__table__
    where = [org_live(items, org_id), items.c.state == models.State.ACTIVE.value, items.c.ttl_seconds.is_(None),
             not_gone_by_expiry(items, db_clock())]
    if governed is not None:
        where.append(governed)
    return session.execute(
        update(items).where(*where).values(expires_at=plus_seconds(items.c.created_at, retention_seconds))
    ).rowcount


def mirror_org_hold(session, org_id: str, held: bool) -> None:
    """Mirror the org's hold (or release) on its active rows (`org_held`), those not already gone by their
    expiry; in the transaction that changes the org row."""
    items = models.MediaItem.__table__
    where = [org_live(items, org_id), items.c.state == models.State.ACTIVE.value, items.c.org_held.is_(not held)]
    if held:
        # An item already gone by its expiry stays gone (`not_gone_by_expiry`): the hold does not bring it back.
        where.append(not_gone_by_expiry(items, db_clock()))
    session.execute(update(items).where(*where).values(org_held=held))


# -- reconcile: blobs found missing --------------------------------------------------------------------


def mark_missing_since(session, ids: list[str]) -> None:
    """Record that the blobs of these active items were found missing now (database clock), where not
    recorded already."""
    items = models.MediaItem.__table__
    session.execute(update(items).where(items.c.id.in_(ids), items.c.state == models.State.ACTIVE.value,
                                        items.c.missing_since.is_(None)).values(missing_since=db_now()))


def clear_missing_since(session, ids: list[str]) -> None:
    """Forget that these items' blobs were missing: they were seen again."""
    items = models.MediaItem.__table__
    session.execute(update(items).where(items.c.id.in_(ids)).values(missing_since=None))


def tombstone_missing(session, ids: list[str], grace_seconds: int) -> list:
    """Tombstone (reason `missing_blob`) those of `ids` that are still claimable and either expired or
    recorded missing at least `grace_seconds` ago, every condition re-checked on the row itself (a hold
    or a claim committed since wins). Returns `id`, `org_id` of each row it changed."""
    items = models.MediaItem.__table__
    State, Reason = models.State, models.Reason
    return session.execute(
        update(items)
        .where(items.c.id.in_(ids), claimable(),
               or_(items.c.expires_at <= db_now(),
                   and_(items.c.missing_since.is_not(None),
                        items.c.missing_since <= db_now(-grace_seconds))))
        .values(state=State.DELETED.value, deletion_reason=Reason.MISSING_BLOB.value, deleted_at=db_now(),
                claimed_at=db_now())
        .returning(items.c.id, items.c.org_id)
    ).all()


# -- tombstone compaction ------------------------------------------------------------------------------


def compact_tombstones(session, older_than_seconds: int, limit: int) -> int:
    """Remove up to `limit` tombstones deleted more than `older_than_seconds` ago, oldest first; never a
    live or claimed row, nor a `missing_blob` tombstone of an item that has not expired. Returns how many."""
    items, variants = models.MediaItem.__table__, models.MediaVariant.__table__
    batch = (select(items.c.id).where(compactable(items, db_now(-older_than_seconds), db_now()))
             .order_by(items.c.deleted_at).limit(limit))
    ids = list(session.scalars(batch.with_for_update()))
    if not ids:
        return 0
    # A tombstone's variant rows go with it: their blobs went with the item (or, leaked, are orphans from now
    # on, which reconcile deletes after its grace, exactly like the item's own leaked blob).
    for start in range(0, len(ids), 1000):
        session.execute(delete(variants).where(variants.c.item_id.in_(ids[start:start + 1000])))
    removed = 0
    for start in range(0, len(ids), 1000):
        removed += session.execute(delete(items).where(items.c.id.in_(ids[start:start + 1000]))).rowcount
    return removed
