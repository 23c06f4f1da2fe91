"""Verify: check the catalog against the store and report every breach of the invariants. Reads only.

The catalog's rows (keyset pages ordered by storage key) and the store's listing (ordered by key)
are merged like two sorted files, so every key is looked at once, nothing is held but a page, and no
blob is looked up one by one: memory stays flat on a million items and an S3 store costs one LIST
request per 1000 blobs. A difference between the two streams is only a *candidate*: a sweep or a
registration may have moved on between the page and the listing, so each candidate is read again
(its row, and a stat of its blob) before it is reported.

Breaches (exit 1), each an invariant of the design's Part 1:

- `early_deletion`: an item claimed for deletion by a sweep (reason `ttl`/`retention`) before it
  expired. Judged three ways: against the expiry stored on the row at claim time; for a TTL,
  against `created_at + ttl` (a TTL never changes); for retention, against the org's retention when
  that has not changed since the claim (`organizations.updated_at`), which catches an expiry that
  was rewritten wrongly before the claim.
- `held_deleted`: a row carrying a hold (`held_at` or `org_held`) that is not active, or an item of
  a held org claimed after the org's hold was placed. (An item claimed before a hold is documented
  to finish its deletion, so that is no breach.)

Both compare a claim's time with the time a hold or retention change took effect, which is stamped
once the change has locked the org's rows (`worker/catalog/_shared.py`, `took_effect_at`): a claim
the change had to wait for, which followed the policy then in force, is dated before it.
- `wrong_expiry`: an active item whose `expires_at` is not `created_at` plus its TTL, the most specific
  retention rule of its org matching its MIME type, or its org's retention: it would be deleted at the
  wrong time. The rules are read with the org's `updated_at` (which every rule change stamps) and read
  again when a row shows a newer one; a row read before a change that committed since is not judged. An
  unheld item that had expired before the org's last change keeps its old expiry: it was gone already, and
  no policy change revives it (`worker/items/predicates.py`, `not_gone_by_expiry`).
- `tombstone_with_blob`: a deleted item whose blob, or a variant's blob, still exists (a leak). A `missing_blob`
  tombstone of an item that has not expired yet whose blob came back is a notice (`returned_blobs`),
  not a breach: reconcile deliberately keeps such a blob until the item's expiry.
  On a versioned bucket any version holding bytes counts (current or not); a key left with only delete
  markers is a notice (`delete_markers`): no bytes, but clutter our version-exact deletes never leave.
- `missing_blob`: an active item whose blob, or a variant's blob, is missing (on a versioned bucket: whose
  latest entry is a delete marker). Variants are the item's derived blobs (`media_variants`), merged into the
  catalog's stream by key and judged by their item's state.
- `size_mismatch`: an active item whose blob's size differs from the size the catalog recorded.
- `stuck_deletion`: a `deleting` row whose lease ran out more than `stuck_after` ago. A running
  fleet re-claims an expired lease at its next sweep (stale claims go first), so with the default
  (two sweep intervals plus a minute) only a fleet that stopped sweeping trips it.
- `orphan_blob`: a blob no row (in any state) points at, older than the grace. Younger ones are
  counted as `young_blobs`: a registration writes its blob before its row.
- `abandoned_upload`: what a killed upload left (a `.incoming-*` temporary file, an unfinished S3
  multipart upload), older than the grace. Reconcile removes both.

A deletion the store refuses because the version is locked (S3 Object Lock) is not a breach: the item
answers 404 and its bytes wait for the lock's date. It is counted as the notice `locked`, with examples
(`locked_examples`: reason and retain-until date). It becomes a `stuck_deletion` only when that date has
passed by more than `stuck_after` and no sweep finished it.

Store or catalog errors on single keys are counted as `check_errors`; they also make the result
unclean, since what could not be checked cannot be called clean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select

from worker import items as items_sql
from worker.binding import StoreBinding
from worker.db import Database, db_now
from config.errors import RetentionError
from worker.models import Reason, State
from worker.policy import governing_pattern, lifetime
from worker.catalog.rules import rules_with_stamp
from worker.store import BlobInfo, BlobStore, PartialUpload

log = structlog.get_logger("worker.verify")

BREACH_KINDS = (
    "early_deletion",
    "held_deleted",
    "wrong_expiry",
    "tombstone_with_blob",
    "missing_blob",
    "size_mismatch",
    "stuck_deletion",
    "orphan_blob",
    "abandoned_upload",
)
NOTICE_KINDS = ("returned_blobs", "young_blobs", "failing_deletions", "locked", "delete_markers")

# Rows read per catalog page: one short transaction each, a few hundred kilobytes of rows at most.
PAGE = 1000
# Candidates re-read per round: one query and a few stat round trips for up to this many keys.
CONFIRM_BATCH = 500
# Blob stats in flight while confirming candidates: an S3 HEAD is a round trip, a local stat is not.
CHECK_THREADS = 8
# Progress lines come at most this often, so a long run shows it is alive.
PROGRESS_EVERY_S = 5.0
DEFAULT_EXAMPLES = 10
DEFAULT_GRACE = timedelta(days=1)


def default_stuck_after(sweep_interval: timedelta) -> timedelta:
    """Two sweep intervals and a minute: a running fleet re-claims an expired lease at its next sweep."""
    return 2 * sweep_interval + timedelta(minutes=1)


class OutOfOrder(RetentionError):
    """A stream did not come in key order, so the merge cannot be trusted."""


@dataclass
class VerifyReport:
    grace_seconds: int
    stuck_after_seconds: int
    max_examples: int
    checked_at: str | None = None
    items_checked: int = 0
    variants_checked: int = 0  # derived blobs (thumbnails, previews) checked with their items
    blobs_listed: int = 0
    check_errors: int = 0
    breaches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BREACH_KINDS, 0))
    notices: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NOTICE_KINDS, 0))
    examples: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in BREACH_KINDS})
    error_examples: list[dict] = field(default_factory=list)
    locked_examples: list[dict] = field(default_factory=list)

    @property
    def total_breaches(self) -> int:
        return sum(self.breaches.values())

    @property
    def clean(self) -> bool:
        return self.total_breaches == 0 and self.check_errors == 0

    def breach(self, kind: str, example: dict) -> None:
        self.breaches[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(example)

    def error(self, key: str, message: str) -> None:
        self.check_errors += 1
        if len(self.error_examples) < self.max_examples:
            self.error_examples.append({"key": key, "error": message})

    def to_dict(self) -> dict:
        return {
            "clean": self.clean,
            "breaches_total": self.total_breaches,
            "breaches": dict(self.breaches),
            "examples": {kind: examples for kind, examples in self.examples.items() if examples},
            "notices": dict(self.notices),
            "check_errors": self.check_errors,
            "check_error_examples": self.error_examples,
            "locked_examples": self.locked_examples,
            "items_checked": self.items_checked,
            "variants_checked": self.variants_checked,
            "blobs_listed": self.blobs_listed,
            "grace_seconds": self.grace_seconds,
            "stuck_after_seconds": self.stuck_after_seconds,
            "checked_at": self.checked_at,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass
class _Candidate:
    """A key whose row and blob disagree in the merge; confirmed by a fresh read before it counts."""

    key: str
    blob: BlobInfo | None


class Verifier:
    def __init__(self, db: Database, store: BlobStore, *, progress: Callable[[str], None] | None = None,
                 binding: StoreBinding | None = None):
        self.db = db
        self.store = store
        self.binding = binding or StoreBinding(db, store)
        self.progress = progress or (lambda message: None)
        self._progress = self.progress

    def run(self, *, grace: timedelta = DEFAULT_GRACE, stuck_after: timedelta, max_examples: int = DEFAULT_EXAMPLES,
            progress: Callable[[str], None] | None = None) -> VerifyReport:
        # A caller's progress for this run (the CLI's), else the one given at construction.
        self._progress = progress or self.progress
        # Comparing a catalog with a store that is not its own would report every blob and item as a breach.
        self.binding.require()
        report = VerifyReport(grace_seconds=int(grace.total_seconds()), stuck_after_seconds=int(stuck_after.total_seconds()),
                              max_examples=max_examples)
        started = time.monotonic()
        with self.db.transaction() as session:
            self.now = session.scalar(select(db_now()))
        report.checked_at = self.now.isoformat()
        self.orphan_cutoff = self.now - grace
        self.stuck_cutoff = self.now - stuck_after
        self.report = report
        self._pending: list[_Candidate] = []
        self._rules: dict[str, tuple[datetime | None, dict[str, int]]] = {}
        self._last_progress = time.monotonic()
        with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="verify-check") as self._pool:
            self._merge()
            self._confirm()
        log.info("verify.finished", clean=report.clean, breaches=report.total_breaches, check_errors=report.check_errors,
                 items_checked=report.items_checked, blobs_listed=report.blobs_listed,
                 **{kind: count for kind, count in report.breaches.items() if count},
                 seconds=round(time.monotonic() - started, 3))
        return report

    # -- the two ordered streams -----------------------------------------------------------------

    def _rows(self) -> Iterator:
        after: str | None = None
        while True:
            with self.db.transaction() as session:
                rows = items_sql.rows_by_key_order(session, after, PAGE)
            yield from rows
            if len(rows) < PAGE:
                return
            after = rows[-1].storage_key

    @staticmethod
    def _in_order(stream: Iterator, key_of: Callable, what: str) -> Iterator:
        previous = None
        for entry in stream:
            key = key_of(entry)
            if previous is not None and key <= previous:
                raise OutOfOrder(f"the {what} did not list storage keys in byte order ({previous!r} before {key!r}); "
                                 f"run `media-retention db upgrade` (PostgreSQL keys need the \"C\" collation) and verify again.")
            previous = key
            yield entry

    def _blobs(self) -> Iterator[BlobInfo]:
        """The store's blobs in key order; leftovers of killed uploads are judged on the way."""
        for entry in self.store.iter_keys(ordered=True, partial_uploads=True):
            if not isinstance(entry, PartialUpload):
                yield entry
            elif entry.started is not None and entry.started <= self.orphan_cutoff:
                self.report.breach("abandoned_upload", {"key": entry.key, "size": entry.size, "started": _iso(entry.started),
                                                        "upload_id": entry.upload_id})
            else:
                self.report.notices["young_blobs"] += 1

    def _merge(self) -> None:
        rows = self._in_order(self._rows(), lambda row: row.storage_key, "catalog")
        blobs = self._in_order(self._blobs(), lambda blob: blob.key, "store")
        row, blob = next(rows, None), next(blobs, None)
        while row is not None or blob is not None:
            if blob is None or (row is not None and row.storage_key < blob.key):
                self._check_row(row, None)
                row = next(rows, None)
            elif row is None or blob.key < row.storage_key:
                self._check_unclaimed_blob(blob)
                blob = next(blobs, None)
            else:
                self._check_row(row, blob)
                row, blob = next(rows, None), next(blobs, None)
            if len(self._pending) >= CONFIRM_BATCH:
                self._confirm()
            if time.monotonic() - self._last_progress >= PROGRESS_EVERY_S:
                self._progress(f"verified {self.report.items_checked} items and {self.report.blobs_listed} blobs, "
                              f"{self.report.total_breaches} breaches so far")
                self._last_progress = time.monotonic()

    # -- checks ----------------------------------------------------------------------------------

    def _example(self, row, **extra) -> dict:
        example = {"id": row.id, "org": row.org_id, "key": row.storage_key, "state": row.state, **extra}
        if row.variant:
            example["variant_of"] = row.item_key  # a derived blob: the item's key, the item's state
        return example

    def _check_row(self, row, blob: BlobInfo | None) -> None:
        report = self.report
        if blob is not None:
            report.blobs_listed += 1
        if row.variant:
            # A derived blob lives and goes with its item: judged by the item's state, its policy judged once, by the
            # item's own row.
            report.variants_checked += 1
            if (row.state == State.ACTIVE.value and (blob is None or not blob.current or blob.size != row.size_bytes)) \
                    or (row.state == State.DELETED.value and blob is not None):
                self._pending.append(_Candidate(row.storage_key, blob))
            return
        report.items_checked += 1
        self._check_policy(row)
        if row.state == State.ACTIVE.value:
            if blob is None or not blob.current or blob.size != row.size_bytes:
                self._pending.append(_Candidate(row.storage_key, blob))
        elif row.state == State.DELETED.value:
            if blob is not None:
                self._pending.append(_Candidate(row.storage_key, blob))
        elif row.lock_reason is not None and (row.lease_until is None or row.lease_until >= self.stuck_cutoff):
            report.notices["locked"] += 1
            if len(report.locked_examples) < report.max_examples:
                report.locked_examples.append(self._example(row, reason=row.lock_reason, locked_until=_iso(row.locked_until)))
        elif row.lease_until is not None and row.lease_until < self.stuck_cutoff:
            report.breach("stuck_deletion", self._example(row, lease_until=_iso(row.lease_until), attempts=row.attempts,
                                                          last_error=row.last_error))
        elif row.attempts:
            report.notices["failing_deletions"] += 1

    def _check_policy(self, row) -> None:
        """What the row alone can tell: deleted early, deleted while held, an expiry that is wrong."""
        report = self.report
        claimed = row.claimed_at or row.deleted_at
        if row.state != State.ACTIVE.value:
            if row.held_at is not None or row.org_held:
                report.breach("held_deleted", self._example(row, held_at=_iso(row.held_at), org_held=bool(row.org_held),
                                                            reason=row.deletion_reason, claimed_at=_iso(claimed)))
            elif (row.org_held_at is not None and claimed is not None and claimed >= row.org_held_at
                  and row.expires_at > row.org_held_at):
                # (An item that expired before the org's hold took effect was gone already: the hold never covered it.)
                report.breach("held_deleted", self._example(row, org_held_at=_iso(row.org_held_at), reason=row.deletion_reason,
                                                            claimed_at=_iso(claimed)))
            if row.deletion_reason in (Reason.TTL.value, Reason.RETENTION.value) and claimed is not None:
                due = self._earliest_legitimate_claim(row)
                if claimed < due:
                    report.breach("early_deletion", self._example(
                        row, reason=row.deletion_reason, claimed_at=_iso(claimed), expired_at=_iso(due),
                        early_by_seconds=round((due - claimed).total_seconds(), 3)))
        else:
            rules = self._rules_for(row)
            if rules is None:
                return  # the org's policy changed since this row was read: the row cannot be judged
            expected = row.created_at + self._lifetime(row, rules)
            if (row.expires_at != expected and row.held_at is None and not row.org_held
                    and row.org_updated_at is not None and row.expires_at <= row.org_updated_at):
                return  # expired, unheld, before the org's last policy change: gone already, which no change revives
            if row.expires_at != expected:
                report.breach("wrong_expiry", self._example(row, expires_at=_iso(row.expires_at), expected=_iso(expected),
                                                            ttl_seconds=row.ttl_seconds, org_retention_seconds=row.org_retention_seconds,
                                                            rule=governing_pattern(rules, row.mime_type)))

    def _earliest_legitimate_claim(self, row) -> datetime:
        due = row.expires_at
        if row.ttl_seconds is not None:
            due = max(due, row.created_at + timedelta(seconds=row.ttl_seconds))
        elif (row.org_updated_at is not None and row.claimed_at is not None and row.org_updated_at <= row.claimed_at
              and row.expires_at > row.org_updated_at):
            # The org's retention and rules have not changed since the claim (every change of either stamps
            # `updated_at`), so they are the ones the claim had to honour; unless the item had expired before
            # that change, which then left it as it was (gone already: `not_gone_by_expiry`).
            rules = self._rules_for(row)
            if rules is not None:
                due = max(due, row.created_at + self._lifetime(row, rules))
        return due

    @staticmethod
    def _lifetime(row, rules: dict[str, int]) -> timedelta:
        ttl = timedelta(seconds=row.ttl_seconds) if row.ttl_seconds is not None else None
        return lifetime(ttl, timedelta(seconds=row.org_retention_seconds), rules, row.mime_type)

    def _rules_for(self, row) -> dict[str, int] | None:
        """The retention rules of the row's org as they were when the row was read: cached with the org's
        `updated_at`, read again (rules and stamp in one statement) when the row shows another stamp; None
        when the org changed again since the row was read (the row is stale, judged by nothing)."""
        cached = self._rules.get(row.org_id)
        if cached is None or cached[0] != row.org_updated_at:
            with self.db.transaction() as session:
                cached = rules_with_stamp(session, row.org_id)
            self._rules[row.org_id] = cached
        return cached[1] if cached[0] == row.org_updated_at else None

    def _check_unclaimed_blob(self, blob: BlobInfo) -> None:
        self.report.blobs_listed += 1
        if blob.modified is not None and blob.modified <= self.orphan_cutoff:
            self._pending.append(_Candidate(blob.key, blob))
        else:
            self.report.notices["young_blobs"] += 1

    # -- confirmation ------------------------------------------------------------------------------

    def _stat(self, key: str) -> BlobInfo | None | Exception:
        try:
            return self.store.remains(key)  # any version: a tombstone's noncurrent versions are a leak too
        except Exception as exc:  # noqa: BLE001 - one unreadable key must not stop the run; it is counted
            return exc

    def _confirm(self) -> None:
        """Read each candidate's row and blob again; report only what still disagrees."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        keys = [candidate.key for candidate in pending]
        stats = list(self._pool.map(self._stat, keys))
        with self.db.transaction() as session:
            fresh = {row.storage_key: row for row in items_sql.rows_by_keys(session, keys)}
        report = self.report
        for candidate, info in zip(pending, stats, strict=True):
            if isinstance(info, Exception):
                report.error(candidate.key, f"{type(info).__name__}: {info}")
                continue
            row = fresh.get(candidate.key)
            if info is not None and not info.versions:
                info, markers_only = None, True  # delete markers alone: no bytes
            else:
                markers_only = False
            if row is None:
                if info is not None and candidate.blob is not None:
                    report.breach("orphan_blob", {"key": candidate.key, "size": info.size,
                                                  "modified": _iso(candidate.blob.modified), "versions": info.versions})
                elif markers_only:
                    report.notices["delete_markers"] += 1
            elif row.state == State.ACTIVE.value:
                if info is None or not info.current:
                    report.breach("missing_blob", self._example(row, size=row.size_bytes, expires_at=_iso(row.expires_at),
                                                                held=row.held_at is not None or bool(row.org_held)))
                elif info.size != row.size_bytes:
                    report.breach("size_mismatch", self._example(row, size=row.size_bytes, blob_size=info.size))
            elif row.state == State.DELETED.value and info is not None:
                if row.deletion_reason == Reason.MISSING_BLOB.value and row.expires_at > self.now:
                    report.notices["returned_blobs"] += 1
                else:
                    report.breach("tombstone_with_blob", self._example(row, reason=row.deletion_reason,
                                                                       deleted_at=_iso(row.deleted_at), blob_size=info.size,
                                                                       versions=info.versions, current=info.current))
            elif row.state == State.DELETED.value and markers_only:
                report.notices["delete_markers"] += 1
