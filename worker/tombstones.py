"""Tombstone compaction: removing the rows of items deleted long ago, so the catalog grows with its live
media and not with its history.

Every deletion leaves its row behind as a tombstone (state `deleted`), which answers a lookup with 404
`gone` and the reason, and keeps the ID from being reused. A catalog that deletes a million items a day
gains a million rows a day, forever; past a few hundred million rows that is most of its size, its
indexes and its vacuums. Compaction removes tombstones deleted more than a retention ago
(`MEDIA_RETENTION_TOMBSTONE_RETENTION`, or `compact --older-than`), a batch at a time through the
tombstones' deletion-time index. A compacted ID answers 404 `not_found` (a 404 still) and could be
registered again, which is the trade: set the retention longer than anyone asks about deleted media.

Only tombstones are ever touched: never an active or claimed row, so nothing that may still hold a
blob. A blob found later for a compacted ID is an orphan to reconcile, as any other. So a `missing_blob`
tombstone stays until its item has expired: its blob may come back, and reconcile keeps a returned blob
until the item's expiry only while the tombstone is there to say so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

import structlog
from sqlalchemy import insert

from worker import items as items_sql
from worker.db import Database
from worker.models import AuditEvent

log = structlog.get_logger("worker.tombstones")

# Rows removed per transaction: ten thousand index entries and heap tuples is a transaction of a few
# hundred milliseconds, short enough not to hold back vacuum or replicas.
COMPACT_BATCH = 10_000
# Compaction never reaches tombstones younger than this: a retention typo (`1h` for `1y`) must not
# turn a day's worth of 404 `gone` answers into `not_found`.
MINIMUM_AGE = timedelta(days=1)


@dataclass
class CompactionReport:
    older_than_s: int
    removed: int = 0
    batches: int = 0
    dry_run: bool = False
    eligible: int | None = None  # dry runs: how many would go

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


class Tombstones:
    def __init__(self, db: Database, *, batch_size: int = COMPACT_BATCH):
        self.db = db
        self.batch_size = batch_size

    def compact(self, *, older_than: timedelta, actor: str, dry_run: bool = False,
                progress: Callable[[str], None] | None = None) -> CompactionReport:
        """Remove tombstones deleted more than `older_than` ago (at least MINIMUM_AGE), a batch per transaction."""
        if older_than < MINIMUM_AGE:
            raise ValueError(f"tombstones younger than {MINIMUM_AGE} are never compacted")
        report = CompactionReport(older_than_s=int(older_than.total_seconds()), dry_run=dry_run)
        if dry_run:
            with self.db.transaction() as session:
                report.eligible = items_sql.old_tombstone_count(session, report.older_than_s)
            return report
        last_progress = time.monotonic()
        while True:
            with self.db.transaction() as session:
                removed = items_sql.compact_tombstones(session, report.older_than_s, self.batch_size)
                if removed:
                    # Recorded in the batch's own transaction: the trail holds exactly what was removed.
                    session.execute(insert(AuditEvent.__table__).values(
                        action="compact", actor=actor, details={"count": removed, "older_than_s": report.older_than_s}))
            report.removed += removed
            report.batches += 1 if removed else 0
            if progress and time.monotonic() - last_progress >= 2:
                progress(f"compacted {report.removed} tombstones")
                last_progress = time.monotonic()
            if removed < self.batch_size:
                break
        log.info("tombstones.compacted", **report.to_dict())
        return report
