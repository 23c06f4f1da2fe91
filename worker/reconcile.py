"""Reconcile the catalog with the store, in both directions. Holds win over reconcile in every path.

Blobs (the store's listing, each key looked up in the catalog):
- a blob whose key belongs to an active or deleting row is live and never touched;
- a blob whose key belongs to a `deleted` row is a leak, deleted only when that row's item expired
  (database clock) or was purged; the blob of a `missing_blob` tombstone whose item has not
  expired came back after reconcile gave up on it, and is kept (and reported) until the expiry;
- a blob no row points at is an orphan, deleted only when older than the grace and not reserved by a
  registration in flight; so is what a killed upload left (a `.incoming-*` temporary file, an S3
  multipart upload never completed), which every listing skips otherwise. Its age is the store's: on a
  filesystem the later of the modification and change times (`touch -d` back-dates the first but never
  the second, and any rename or chmod refreshes the change time), on S3 LastModified, set by the server.

Every blob reconcile deletes, it deletes holding its key in the catalog (worker/reservations.py): in one
transaction per batch it reserves the keys (taking over only reservations older than the grace: their
registrations died), reads their rows again, deletes what is still doomed, and drops its reservations. A
registration of one of those keys waits for that transaction, then finds the blob gone (a clear error, or
its own copy written anew); one that got there first holds the key, which reconcile then leaves alone.
Reservations older than the grace that nothing took over are dropped at the end of a run.

Items (active rows, each blob checked):
- held (item or org) with a missing blob: never tombstoned; surfaced (report, `status`, metric,
  `verify`) until the blob is back or the hold is released;
- unheld with a missing blob: the first sighting is recorded (`missing_since`, database clock) and
  the item is tombstoned (`missing_blob`, audited with its ID) only when it has expired or was
  already missing at a reconcile at least a grace period earlier, so an unmounted shard or an
  operator's `mv` that is undone in time costs nothing. A blob seen again clears the record.

Both passes stream in fixed-size batches. Neither changes anything until it has counted what it
would change: a wrong database URL, a wrong prefix or an unmounted volume would otherwise look like
"every blob is an orphan" or "every blob is missing". So a count above the absolute limits, or drift of
nearly everything (an empty catalog facing a store with blobs, at least MASS_DRIFT of the listed blobs
orphans, or of the active items missing their blob) aborts with nothing changed, whatever the counts,
unless the operator says it is real (`allow_mass_drift`); a dry run says why it would abort.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select

from worker import items as items_sql
from worker import reservations
from worker.binding import StoreBinding
from worker.db import Database, db_now
from config.errors import BadInput
from worker.models import AuditEvent, Reason, State
from worker.store import BlobInfo, BlobStore, PartialUpload, chunked

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
# Drift of nearly everything: this share of the listed blobs being orphans, or of the active items
# missing their blob, is what a wrong database, prefix or volume looks like, however few they are.
MASS_DRIFT = 0.9
# How many keys / IDs the summary names per list (the counts cover all of them).
LISTED = 50
# Tombstones whose blobs may be deleted as leaks: the operator asked for these to go now.
_PURGED = (Reason.PURGE.value, Reason.ORG_PURGE.value)


@dataclass
class ReconcileReport:
    dry_run: bool
    grace_seconds: int
    blobs_listed: int = 0
    orphans: int = 0  # blobs no row points at, older than the grace
    orphan_bytes: int = 0
    orphans_deleted: int = 0
    leaks: int = 0  # blobs of tombstones whose item expired or was purged
    leaks_deleted: int = 0
    returned_blobs_kept: int = 0  # blobs of unexpired missing_blob tombstones, kept until the expiry
    partial_uploads: int = 0  # leftovers of killed uploads older than the grace (temp files, multipart uploads)
    partial_uploads_discarded: int = 0
    orphan_delete_failures: int = 0
    young_blobs_skipped: int = 0  # blobs and partial uploads younger than the grace: possibly in flight
    reserved_skipped: int = 0  # blobs and partial uploads whose key a registration holds right now
    stale_reservations_dropped: int = 0  # reservations older than the grace (dry run: that would be dropped)
    items_checked: int = 0
    check_errors: int = 0
    missing_blobs: int = 0  # active items whose blob is missing now
    missing_held: int = 0  # ... of them held: never tombstoned, surfaced
    missing_first_seen: int = 0  # ... recorded as missing for the first time by this run
    missing_waiting: int = 0  # ... unheld, unexpired, not yet missing for a grace: a later run decides
    marked_missing: int = 0  # tombstoned with reason missing_blob
    blobs_back: int = 0  # items whose blob was missing at an earlier run and is back
    orphan_keys: list[str] = field(default_factory=list)
    leaked_keys: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    held_missing_ids: list[str] = field(default_factory=list)
    # Why this run refused to change anything (drift of nearly everything); a dry run says it here.
    refused: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class TooMany(BadInput):
    """More drift than the limits allow: probably a misconfiguration, so nothing was changed (exit 2)."""


@dataclass(frozen=True)
class _Doomed:
    key: str
    size: int
    tombstone: bool  # a leak (the key belongs to a deleted row) rather than an orphan (no row)


@dataclass
class _ItemPlan:
    """What the item pass decided, applied only after the counts passed the limits."""

    record: list[str] = field(default_factory=list)  # first sighting: set missing_since
    tombstone: list[tuple[str, str]] = field(default_factory=list)  # (id, key), expired or confirmed: missing_blob tombstones
    clear: list[str] = field(default_factory=list)  # blob back: clear missing_since


class Reconciler:
    def __init__(self, db: Database, store: BlobStore, *, progress: Callable[[str], None] | None = None,
                 binding: StoreBinding | None = None):
        self.db = db
        self.store = store
        self.binding = binding or StoreBinding(db, store)
        self.progress = progress or (lambda message: None)
        self._progress = self.progress

    def run(self, *, grace: timedelta, dry_run: bool = False, max_orphans: int = DEFAULT_MAX_ORPHANS,
            max_missing: int = DEFAULT_MAX_MISSING, allow_mass_drift: bool = False, actor: str = "reconcile",
            progress: Callable[[str], None] | None = None) -> ReconcileReport:
        # A caller's progress for this run (the CLI's), else the one given at construction.
        self._progress = progress or self.progress
        # Only on the store bound to this catalog, dry run or not: a marker missing or naming another catalog
        # is the wrong database, store or prefix, and then every count below would be wrong too.
        self.binding.require()
        report = ReconcileReport(dry_run=dry_run, grace_seconds=int(grace.total_seconds()))
        with self.db.transaction() as session:
            now = session.scalar(select(db_now()))
            catalog_empty = not items_sql.has_items(session)
        cutoff = now - grace
        doomed = self._find_doomed_blobs(report, now, cutoff, max_orphans)
        with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="reconcile-check") as self._pool:
            plan = self._check_items(report, now, cutoff, max_missing)
            report.refused = None if allow_mass_drift else mass_drift(report, catalog_empty)
            if dry_run:
                with self.db.transaction() as session:
                    report.stale_reservations_dropped = reservations.count_stale(session, cutoff)
            else:
                if report.refused:
                    raise TooMany(f"{report.refused}, so nothing was changed (re-run with --allow-mass-drift if it is real).")
                self._delete_blobs(report, doomed, cutoff)
                self._apply(report, plan, grace, actor)
                with self.db.transaction() as session:
                    report.stale_reservations_dropped = reservations.drop_stale(session, cutoff)
        if not dry_run:
            with self.db.transaction() as session:
                session.add(AuditEvent(action="reconcile", actor=actor, details={
                    "orphans_deleted": report.orphans_deleted, "leaks_deleted": report.leaks_deleted,
                    "partial_uploads_discarded": report.partial_uploads_discarded,
                    "marked_missing": report.marked_missing, "orphan_keys": report.orphan_keys,
                    "leaked_keys": report.leaked_keys, "missing_ids": report.missing_ids,
                    "held_missing_ids": report.held_missing_ids}))
        log.info("reconcile.finished", **{k: v for k, v in report.to_dict().items() if not isinstance(v, list)})
        return report

    # -- blobs -----------------------------------------------------------------------------------

    def _owners(self, keys: list[str]) -> tuple[dict, dict]:
        """The rows (any state) and the reservations of `keys`."""
        with self.db.transaction() as session:
            rows = items_sql.key_owners(session, keys)
            reserved = reservations.holders(session, self.db.sql, keys)
        return {row.storage_key: row for row in rows}, reserved

    @staticmethod
    def _leak_may_go(row, now: datetime) -> bool:
        return row.deletion_reason in _PURGED or row.expires_at <= now

    def _find_doomed_blobs(self, report: ReconcileReport, now: datetime, cutoff: datetime, limit: int) -> list[_Doomed | PartialUpload]:
        doomed: list[_Doomed | PartialUpload] = []
        last_progress = time.monotonic()
        for batch in chunked(self.store.iter_keys(partial_uploads=True), BATCH):
            report.blobs_listed += sum(1 for entry in batch if isinstance(entry, BlobInfo))
            rows, reserved = self._owners(sorted({entry.key for entry in batch}))
            for entry in batch:
                if entry.key in reserved and reserved[entry.key] > cutoff and rows.get(entry.key) is None:
                    report.reserved_skipped += 1  # a registration holds the key right now
                    continue
                if isinstance(entry, PartialUpload):
                    found = self._classify_partial_upload(report, entry, rows.get(entry.key), cutoff)
                else:
                    found = self._classify_blob(report, entry, rows.get(entry.key), now, cutoff)
                if found is None:
                    continue
                if isinstance(found, _Doomed) and not found.tombstone and report.orphans > limit:
                    raise TooMany(f"more than {limit} orphan blobs (no item points at them); that looks like the wrong "
                                  f"database or store, so nothing was changed (raise --max-orphans if it is real).")
                doomed.append(found)
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                self._progress(f"listed {report.blobs_listed} blobs, {report.orphans} orphans and {report.leaks} leaks so far")
                last_progress = time.monotonic()
        report.orphan_keys = [entry.key for entry in doomed if isinstance(entry, _Doomed) and not entry.tombstone][:LISTED]
        report.leaked_keys = [entry.key for entry in doomed if isinstance(entry, _Doomed) and entry.tombstone][:LISTED]
        return doomed

    @staticmethod
    def _classify_partial_upload(report: ReconcileReport, upload: PartialUpload, row, cutoff: datetime) -> PartialUpload | None:
        if upload.upload_id is None and row is not None:
            # A file named like our temporary files that an item was registered at (before such names were
            # refused): it is that item's blob, not an upload.
            log.warning("reconcile.registered_blob_with_a_temporary_name", key=upload.key)
            return None
        if upload.started is None or upload.started > cutoff:
            report.young_blobs_skipped += 1
            return None
        report.partial_uploads += 1
        return upload

    def _classify_blob(self, report: ReconcileReport, blob: BlobInfo, row, now: datetime, cutoff: datetime) -> _Doomed | None:
        if row is None:
            if blob.modified is None or blob.modified > cutoff:
                report.young_blobs_skipped += 1
                return None
            report.orphans += 1
            report.orphan_bytes += blob.size
            return _Doomed(blob.key, blob.size, tombstone=False)
        if row.state != State.DELETED.value:
            return None  # live: an active item's blob, or one a sweep is deleting right now
        if not self._leak_may_go(row, now):
            report.returned_blobs_kept += 1
            log.warning("reconcile.returned_blob_kept", key=blob.key, expires_at=row.expires_at.isoformat())
            return None
        report.leaks += 1
        return _Doomed(blob.key, blob.size, tombstone=True)

    def _delete_blobs(self, report: ReconcileReport, doomed: list[_Doomed | PartialUpload], cutoff: datetime) -> None:
        """Delete what the listing found doomed, a batch at a time, each batch in one transaction that holds
        its keys in the catalog (see the module's docstring): what the catalog says then decides, not what
        the listing said."""
        token = secrets.token_hex(16)
        for batch in chunked(doomed, BATCH):
            with self.db.transaction() as session:
                held = reservations.reserve(session, self.db.sql, token, "reconcile", dict.fromkeys(entry.key for entry in batch),
                                            take_over=cutoff)
                now = session.scalar(select(db_now()))
                rows = {row.storage_key: row for row in items_sql.key_owners(session, sorted(held))}
                report.reserved_skipped += sum(1 for entry in batch if entry.key not in held)
                partial = [entry for entry in batch if isinstance(entry, PartialUpload) and entry.key in held
                           and (entry.upload_id is not None or rows.get(entry.key) is None)]
                blobs = [entry for entry in batch if isinstance(entry, _Doomed) and entry.key in held
                         and self._still_doomed(entry, rows.get(entry.key), now)]
                self._discard(report, partial)
                self._delete(report, blobs)
                reservations.drop(session, token)

    def _discard(self, report: ReconcileReport, partial: list[PartialUpload]) -> None:
        for result in self.store.discard_partial_uploads(partial) if partial else []:
            if result.ok:
                report.partial_uploads_discarded += 1
            else:
                report.orphan_delete_failures += 1
                log.warning("reconcile.partial_upload_discard_failed", key=result.key, error=result.error)

    def _delete(self, report: ReconcileReport, blobs: list[_Doomed]) -> None:
        is_leak = {entry.key: entry.tombstone for entry in blobs}
        for result in self.store.delete_many(list(is_leak)) if is_leak else []:
            if not result.ok:
                report.orphan_delete_failures += 1
                log.warning("reconcile.blob_delete_failed", key=result.key, error=result.error)
            elif is_leak[result.key]:
                report.leaks_deleted += 1
            else:
                report.orphans_deleted += 1

    def _still_doomed(self, entry: _Doomed, row, now: datetime) -> bool:
        if not entry.tombstone:
            return row is None
        return row is not None and row.state == State.DELETED.value and self._leak_may_go(row, now)

    # -- items -----------------------------------------------------------------------------------

    def _blob_present(self, key: str) -> bool | None:
        """True/False when the store answers; None when it cannot say (never counted as missing)."""
        try:
            return self.store.exists(key)
        except Exception as exc:  # noqa: BLE001 - one unreadable key must not stop the pass
            log.warning("reconcile.check_failed", key=key, error=str(exc))
            return None

    def _check_items(self, report: ReconcileReport, now: datetime, confirmed_before: datetime, limit: int) -> _ItemPlan:
        plan = _ItemPlan()
        after = ""
        last_progress = time.monotonic()
        held_ids: list[str] = []
        while True:
            with self.db.transaction() as session:
                rows = items_sql.active_after(session, after, BATCH)
            if not rows:
                break
            after = rows[-1].id
            for row, present in zip(rows, self._pool.map(self._blob_present, [row.storage_key for row in rows]), strict=True):
                report.items_checked += 1
                if present is None:
                    report.check_errors += 1
                elif present:
                    if row.missing_since is not None:
                        report.blobs_back += 1
                        plan.clear.append(row.id)
                else:
                    report.missing_blobs += 1
                    if report.missing_blobs > limit:
                        raise TooMany(f"more than {limit} active items have no blob; that looks like an unmounted volume or "
                                      f"the wrong store, so nothing was changed (raise --max-missing if it is real).")
                    self._plan_missing(report, plan, row, now, confirmed_before, held_ids)
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                self._progress(f"checked {report.items_checked} items, {report.missing_blobs} missing blobs so far")
                last_progress = time.monotonic()
        report.held_missing_ids = held_ids[:LISTED]
        return plan

    @staticmethod
    def _plan_missing(report: ReconcileReport, plan: _ItemPlan, row, now: datetime, confirmed_before: datetime,
                      held_ids: list[str]) -> None:
        if row.missing_since is None:
            report.missing_first_seen += 1
            plan.record.append(row.id)
        if row.held_at is not None or row.org_held:
            report.missing_held += 1
            held_ids.append(row.id)
            log.warning("reconcile.held_blob_missing", media_id=row.id, key=row.storage_key)
        elif row.expires_at <= now or (row.missing_since is not None and row.missing_since <= confirmed_before):
            plan.tombstone.append((row.id, row.storage_key))
        else:
            report.missing_waiting += 1

    def _apply(self, report: ReconcileReport, plan: _ItemPlan, grace: timedelta, actor: str) -> None:
        for batch in chunked(plan.record, BATCH):
            with self.db.transaction() as session:
                items_sql.mark_missing_since(session, batch)
        for batch in chunked(plan.clear, BATCH):
            with self.db.transaction() as session:
                items_sql.clear_missing_since(session, batch)
        marked: list[str] = []
        for batch in chunked(plan.tombstone, BATCH):
            marked.extend(self._mark_missing(report, batch, grace, actor))
        report.missing_ids = marked[:LISTED]

    def _mark_missing(self, report: ReconcileReport, batch: list[tuple[str, str]], grace: timedelta, actor: str) -> list[str]:
        """Tombstone the items whose blob is still missing, in one statement that re-checks every
        condition on the row itself, so a hold or a claim committed since the check wins."""
        keys = dict(batch)
        present = self._pool.map(self._blob_present, keys.values())
        still_missing = [media_id for media_id, found in zip(keys, present, strict=True) if found is False]
        if not still_missing:
            return []
        with self.db.transaction() as session:
            tombstoned = items_sql.tombstone_missing(session, still_missing, int(grace.total_seconds()))
            marked = [media_id for media_id, _ in tombstoned]
            # One event per org, naming only its own IDs, so each org's trail shows its own tombstones.
            ids_by_org: dict[str, list[str]] = {}
            for media_id, org_id in tombstoned:
                ids_by_org.setdefault(org_id, []).append(media_id)
            for org_id, org_ids in sorted(ids_by_org.items()):
                session.add(AuditEvent(action="reconcile_missing_blob", actor=actor, org_id=org_id, reason=Reason.MISSING_BLOB.value,
                                       details={"ids": sorted(org_ids), "count": len(org_ids)}))
        report.marked_missing += len(marked)
        for media_id in marked:
            log.warning("reconcile.missing_blob_tombstoned", media_id=media_id, key=keys[media_id])
        return marked


def mass_drift(report: ReconcileReport, catalog_empty: bool) -> str | None:
    """Why this run's drift looks like a misconfiguration rather than drift (None when it does not): an empty
    catalog facing a store with blobs, nearly every listed blob an orphan, or nearly every active item missing
    its blob, however few they are."""
    if catalog_empty and report.blobs_listed:
        return (f"this catalog has no items but the store lists {report.blobs_listed} blobs: that looks like the wrong "
                f"database (is MEDIA_RETENTION_DATABASE_URL set?)")
    if report.orphans and report.orphans >= MASS_DRIFT * report.blobs_listed:
        return (f"{report.orphans} of the {report.blobs_listed} blobs listed have no item in this catalog: that looks like "
                f"the wrong database or the wrong prefix")
    if report.missing_blobs and report.missing_blobs >= MASS_DRIFT * report.items_checked:
        return (f"{report.missing_blobs} of the {report.items_checked} active items have no blob: that looks like an "
                f"unmounted volume or the wrong store or prefix")
    return None
