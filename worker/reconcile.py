"""Reconcile the catalog with the store, in both directions.

- orphan blobs: blobs under the root/prefix that no live (active or deleting) item points at, and
  older than a grace period (a registration writes its blob before its row) -> deleted;
- missing blobs: active items whose blob is gone -> tombstones with reason `missing_blob`, so their
  IDs answer 404 instead of pointing at nothing.

Both passes stream in fixed-size batches (flat memory however large the store). Neither changes
anything until it has counted what it would change: a wrong database URL or an unmounted volume
would otherwise look like "every blob is an orphan" or "every blob is missing", so a count above
the limits aborts with nothing changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select, update

from worker.db import Database, db_now
from worker.errors import RetentionError
from worker.models import AuditEvent, MediaItem, Reason, State
from worker.store import BlobStore, chunked

log = structlog.get_logger("worker.reconcile")

# Keys looked up per query and blobs statted per round: one round trip amortised over many keys.
BATCH = 1000
# Blob existence checks in flight at once: an S3 HEAD is a round trip, a local stat is not.
CHECK_THREADS = 8
# Progress lines come at most this often, so a long listing shows it is alive.
PROGRESS_EVERY_S = 5.0
# Defaults for the safety limits: more than this many orphans or missing blobs in one run is far more
# likely a misconfiguration (wrong database, wrong prefix, unmounted volume) than real drift.
DEFAULT_MAX_ORPHANS = 10_000
DEFAULT_MAX_MISSING = 1_000
# How many orphan keys / missing IDs the summary names (the counts cover all of them).
LISTED = 50


@dataclass
class ReconcileReport:
    dry_run: bool
    grace_seconds: int
    blobs_listed: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    orphans_deleted: int = 0
    orphan_delete_failures: int = 0
    young_blobs_skipped: int = 0
    items_checked: int = 0
    check_errors: int = 0
    missing_blobs: int = 0
    marked_missing: int = 0
    orphan_keys: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class TooMany(RetentionError):
    """More drift than the limits allow: probably a misconfiguration, so nothing was changed."""


class Reconciler:
    def __init__(self, db: Database, store: BlobStore, *, progress: Callable[[str], None] | None = None):
        self.db = db
        self.store = store
        self.progress = progress or (lambda message: None)

    def run(self, *, grace: timedelta, dry_run: bool = False, max_orphans: int = DEFAULT_MAX_ORPHANS,
            max_missing: int = DEFAULT_MAX_MISSING, actor: str = "reconcile") -> ReconcileReport:
        report = ReconcileReport(dry_run=dry_run, grace_seconds=int(grace.total_seconds()))
        with self.db.transaction() as session:
            cutoff = session.scalar(select(db_now())) - grace
        orphans = self._find_orphans(report, cutoff, max_orphans)
        with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="reconcile-check") as self._pool:
            missing = self._find_missing(report, max_missing)
        if not dry_run:
            self._delete_orphans(report, orphans)
            self._mark_missing(report, missing)
            with self.db.transaction() as session:
                session.add(AuditEvent(action="reconcile", actor=actor, details={
                    "orphans_deleted": report.orphans_deleted, "marked_missing": report.marked_missing,
                    "orphan_keys": report.orphan_keys, "missing_ids": report.missing_ids}))
        log.info("reconcile.finished", **{k: v for k, v in report.to_dict().items() if not isinstance(v, list)})
        return report

    def _live_keys(self, keys: list[str]) -> set[str]:
        with self.db.transaction() as session:
            return set(session.scalars(
                select(MediaItem.storage_key).where(MediaItem.storage_key.in_(keys), MediaItem.state != State.DELETED.value)
            ))

    def _find_orphans(self, report: ReconcileReport, cutoff: datetime, limit: int) -> list[tuple[str, int]]:
        orphans: list[tuple[str, int]] = []
        last_progress = time.monotonic()
        for batch in chunked(self.store.iter_keys(), BATCH):
            report.blobs_listed += len(batch)
            live = self._live_keys([blob.key for blob in batch])
            for blob in batch:
                if blob.key in live:
                    continue
                if blob.modified is None or blob.modified > cutoff:
                    report.young_blobs_skipped += 1
                    continue
                report.orphans += 1
                report.orphan_bytes += blob.size
                if report.orphans > limit:
                    raise TooMany(f"more than {limit} orphan blobs (no live item points at them); that looks like the wrong "
                                  f"database or store, so nothing was changed (raise --max-orphans if it is real).")
                orphans.append((blob.key, blob.size))
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                self.progress(f"listed {report.blobs_listed} blobs, {report.orphans} orphans so far")
                last_progress = time.monotonic()
        report.orphan_keys = [key for key, _ in orphans[:LISTED]]
        return orphans

    def _find_missing(self, report: ReconcileReport, limit: int) -> list[str]:
        missing: list[str] = []
        after = ""
        last_progress = time.monotonic()
        while True:
            with self.db.transaction() as session:
                rows = session.execute(
                    select(MediaItem.id, MediaItem.storage_key)
                    .where(MediaItem.state == State.ACTIVE.value, MediaItem.id > after)
                    .order_by(MediaItem.id)
                    .limit(BATCH)
                ).all()
            if not rows:
                break
            after = rows[-1].id
            for row, present in zip(rows, self._pool.map(self._blob_present, [row.storage_key for row in rows]), strict=True):
                report.items_checked += 1
                if present is None:
                    report.check_errors += 1
                elif not present:
                    report.missing_blobs += 1
                    if report.missing_blobs > limit:
                        raise TooMany(f"more than {limit} active items have no blob; that looks like an unmounted volume or "
                                      f"the wrong store, so nothing was changed (raise --max-missing if it is real).")
                    missing.append(row.id)
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                self.progress(f"checked {report.items_checked} items, {report.missing_blobs} missing blobs so far")
                last_progress = time.monotonic()
        report.missing_ids = missing[:LISTED]
        return missing

    def _blob_present(self, key: str) -> bool | None:
        """True/False when the store answers; None when it cannot say (never counted as missing)."""
        try:
            return self.store.exists(key)
        except Exception as exc:  # noqa: BLE001 - one unreadable key must not stop the pass
            log.warning("reconcile.check_failed", key=key, error=str(exc))
            return None

    def _delete_orphans(self, report: ReconcileReport, orphans: list[tuple[str, int]]) -> None:
        for batch in chunked(orphans, BATCH):
            # Re-check just before deleting: a row registered since the listing makes the blob live again.
            live = self._live_keys([key for key, _ in batch])
            doomed = [key for key, _ in batch if key not in live]
            for result in self.store.delete_many(doomed):
                if result.ok:
                    report.orphans_deleted += 1
                else:
                    report.orphan_delete_failures += 1
                    log.warning("reconcile.orphan_delete_failed", key=result.key, error=result.error)

    def _mark_missing(self, report: ReconcileReport, missing: list[str]) -> None:
        items = MediaItem.__table__
        for batch in chunked(missing, BATCH):
            with self.db.transaction() as session:
                # Only rows still active: one a sweep claimed meanwhile is that sweep's to finish.
                result = session.execute(
                    update(items)
                    .where(items.c.id.in_(batch), items.c.state == State.ACTIVE.value)
                    .values(state=State.DELETED.value, deletion_reason=Reason.MISSING_BLOB.value, deleted_at=db_now(),
                            claimed_at=db_now())
                )
                report.marked_missing += result.rowcount
            for media_id in batch:
                log.warning("reconcile.missing_blob", media_id=media_id)
