"""Sweep runs and fleet status: what the last sweep did, how much is due, what is stuck.

Everything here is read from the database, so any process (a CLI, an exporter, any worker) sees the
whole fleet's numbers, not its own.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from worker.db import Database, db_now
from worker.models import SweepRun
from worker import items as items_sql
from worker.sweep import SweepCounts

log = structlog.get_logger("worker.status")

# How many stuck items `status` lists by name; the count covers all of them.
STUCK_LISTING = 20
# Lateness (deleted_at - expires_at) is reported over the deletions of this window, at most this many
# of the latest: long enough to hold a few beat sweeps, bounded so the figures cost a few milliseconds.
LATENESS_WINDOW = timedelta(minutes=15)
LATENESS_SAMPLE = 10_000
# Reasons of deletions by expiry: purges go early on purpose and missing blobs when they are found.
EXPIRY_REASONS = ("ttl", "retention")
# Why a store refuses to delete a version (S3 Object Lock): a retention period, or a legal hold.
LOCK_REASONS = ("retention", "legal_hold")


def schedule_slot(now: datetime, interval_seconds: float) -> str:
    """The beat slot a moment falls in; every beat's message for the same slot maps to the same string."""
    return f"{int(interval_seconds)}s:{int(now.timestamp() // interval_seconds)}"


def plan_fanout(due: int, batch_size: int, max_fanout: int) -> int:
    """Extra drain tasks to send so idle worker processes share a backlog: one per further batch,
    capped. A backlog the coordinator clears in one batch needs no help."""
    if due <= batch_size:
        return 0
    return min(math.ceil(due / batch_size) - 1, max_fanout)


def start_run(db: Database, *, kind: str, worker: str | None, interval_seconds: float | None = None) -> int | None:
    """Record a sweep's start and return its id. For a scheduled sweep, None when its slot is already taken."""
    with db.transaction() as session:
        now = session.scalar(select(db_now()))
    slot = schedule_slot(now, interval_seconds) if interval_seconds else None
    try:
        with db.transaction() as session:
            run = SweepRun(kind=kind, slot=slot, worker=worker)
            session.add(run)
            session.flush()
            return run.id
    except IntegrityError:
        log.info("sweep.slot_taken", slot=slot, worker=worker)
        return None


def add_counts(db: Database, run_id: int, counts: SweepCounts, *, finished: bool = False, fanout: int | None = None) -> None:
    """Add counts to a run atomically (drains finish concurrently with their coordinator)."""
    table = SweepRun.__table__
    values = {
        name: table.c[name] + getattr(counts, name)
        for name in ("claimed", "deleted", "failed", "bytes_freed")
    }
    if finished:
        values.update(finished_at=db_now(), held_skipped=counts.held_skipped)
    if fanout is not None:
        values["fanout"] = fanout
    with db.transaction() as session:
        session.execute(update(table).where(table.c.id == run_id).values(**values))


def due_count(db: Database) -> int:
    """Expired, unheld, active items: what a sweep would claim now (index range scan on expiry)."""
    with db.transaction() as session:
        return items_sql.due_count(session)


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list (`share` 0.5 = median, 0.99 = p99)."""
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


def lateness(session) -> dict:
    """How late the fleet's latest deletions by expiry went: p50, p99 and max of deleted_at - expires_at
    (both by the database clock) over LATENESS_WINDOW, read by the tombstones' deletion-time index."""
    rows = items_sql.recent_deletions(session, int(LATENESS_WINDOW.total_seconds()), EXPIRY_REASONS, LATENESS_SAMPLE)
    figures: dict = {"window_s": int(LATENESS_WINDOW.total_seconds()), "items": len(rows)}
    if rows:
        seconds = sorted((deleted - expires).total_seconds() for expires, deleted in rows)
        figures.update(p50_s=round(percentile(seconds, 0.5), 3), p99_s=round(percentile(seconds, 0.99), 3),
                       max_s=round(seconds[-1], 3))
    return figures


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def fleet_status(db: Database) -> dict:
    """The numbers an operator asks for first: last sweep, backlog, oldest overdue item, stuck deletions."""
    runs = SweepRun.__table__
    with db.transaction() as session:
        now = session.scalar(select(db_now()))
        last = session.execute(select(runs).order_by(runs.c.started_at.desc(), runs.c.id.desc()).limit(1)).first()
        last_finished = session.execute(
            select(runs).where(runs.c.finished_at.is_not(None)).order_by(runs.c.finished_at.desc()).limit(1)
        ).first()
        due_items, due_bytes = items_sql.due_totals(session)
        deleting_items = items_sql.deleting_count(session)
        oldest = items_sql.oldest_overdue(session)
        # Stuck: a delete failed at least once, or a claim's lease ran out and nobody took it over yet.
        stuck_count, stuck = items_sql.stuck_claims(session, STUCK_LISTING)
        held_expired = items_sql.held_expired_count(session)
        missing_count, missing_held = items_sql.missing_blob_counts(session)
        locked_counts, locked_earliest, locked = items_sql.locked_deletions(session, STUCK_LISTING)
        late = lateness(session)

    def run_dict(row) -> dict | None:
        if row is None:
            return None
        return {
            "id": row.id, "kind": row.kind, "worker": row.worker, "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at), "fanout": row.fanout, "claimed": row.claimed, "deleted": row.deleted,
            "failed": row.failed, "bytes_freed": row.bytes_freed, "held_skipped": row.held_skipped,
        }

    return {
        "now": now.isoformat(),
        "last_sweep": run_dict(last),
        "last_finished_sweep": run_dict(last_finished),
        "backlog": {"due": int(due_items), "deleting": int(deleting_items), "total": int(due_items) + int(deleting_items), "due_bytes": int(due_bytes)},
        "oldest_overdue": None if oldest is None else {
            "id": oldest.id, "expires_at": oldest.expires_at.isoformat(),
            "overdue_seconds": round((now - oldest.expires_at).total_seconds(), 3),
        },
        "stuck": {
            "count": int(stuck_count),
            "items": [
                {"id": r.id, "attempts": r.attempts, "last_error": r.last_error, "lease_until": _iso(r.lease_until), "claimed_at": _iso(r.claimed_at)}
                for r in stuck
            ],
        },
        "held_expired": int(held_expired),
        "lateness": late,
        "missing_blob_items": {"count": int(missing_count), "held": int(missing_held)},
        # Deletions the store refuses because the version is locked (Object Lock): the items answer 404, their
        # bytes wait for the lock, and the next sweep after `locked_until` deletes them.
        "locked_deletions": {
            "count": sum(locked_counts.values()),
            "by_reason": {reason: int(locked_counts.get(reason, 0)) for reason in LOCK_REASONS},
            "earliest_until": _iso(locked_earliest),
            "items": [{"id": r.id, "key": r.storage_key, "reason": r.lock_reason, "locked_until": _iso(r.locked_until)}
                      for r in locked],
        },
    }
