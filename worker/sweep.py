"""The sweep: claim expired media -> delete blobs -> finalize. Purges run the same pipeline.

Expiry sweeps on PostgreSQL run each batch in ONE transaction (`Sweeper.expire_batch`): pick the batch
`FOR UPDATE SKIP LOCKED` (stale claims first, then expired claimable items, cut off by the database clock),
read its variants after the lock, delete its blobs while the row locks are held, then write each row once (a
`deleted` tombstone, or `deleting` with a backoff lease for a failed delete) with the audit rows, and commit.
No claim needs to commit first: an expired, unheld item answers 404 on every lookup path from its expiry
whatever its row says. A crash before the commit leaves the rows active and expired (still 404), and the next
sweep takes them at once (a missing blob counts as deleted). A hold, an `org set` or a variant add that wants
one of the rows waits for the lock and re-checks it after the commit. Cost: one row write per deletion
instead of two (tests/bench/bench_sweep_writes.py). Known gap: a hold or a longer retention landing between a
batch killed after its deletes and the next sweep revives an item whose blob is gone
(tests/integration/test_sweep_one_transaction.py, strict xfail).

Purges (media that has NOT expired) and every sweep on SQLite (one write lock for the whole database: holding
it across store I/O would block every registration) keep the two-phase path, each step its own short
transaction, no row lock held across blob I/O:

1. claim: one `UPDATE ... RETURNING` moves a batch to `deleting` under a lease, cut off by the
   database clock. On PostgreSQL the batch is picked `FOR UPDATE SKIP LOCKED`, so concurrent
   sweepers take disjoint batches. Holds live on the item rows (`held_at`, and `org_held` mirrored
   from the org), so a hold, a release or a retention rewrite and a claim meet on the same row
   lock: a claim that finds a row changed by a committed hold re-checks the new version and leaves
   it. The claim commits before any blob is touched; from then on lookups answer 404.
2. delete: `store.delete_targets((key, version) ...)` with a result per item; a missing blob counts as
   deleted. On a versioned bucket the recorded version goes, or every version of the key when none was
   recorded, so nothing of the blob stays behind (no noncurrent version, no delete marker).
3. finalize: successes become `deleted` tombstones; failures stay `deleting` with `last_error`,
   one more attempt and a lease pushed out by exponential backoff, so a later sweep retries them. A
   delete the store refused because the version is locked (Object Lock) stays `deleting` too, with the
   lock's reason and date on the row, and its lease set to that date (a legal hold: the capped backoff).

A two-phase worker that dies anywhere leaves rows in `deleting` whose lease runs out; the next sweep claims
them again first and finishes the job (deleting an already-deleted blob is a success).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import structlog
from sqlalchemy import insert, select

from worker import items as items_sql
from worker import metrics
from worker.binding import StoreBinding
from worker.db import Database, db_clock
from worker.models import AuditEvent, Reason
from worker.store import BlobStore, DeleteResult

log = structlog.get_logger("worker.sweep")

# Retry backoff for failed deletes: 30 s doubling per attempt, capped at an hour so a store outage
# is retried at least hourly once it heals.
BACKOFF_BASE_SECONDS = 30
BACKOFF_CAP_SECONDS = 3600
# How many items a dry run lists by name; the counts always cover everything.
DRY_RUN_LISTING = 1000
# Batches between claim and finalize at once: one being claimed, two being deleted (so an object
# store has the next request in flight while the last answer is parsed), one being finalized. Each
# stage then hides the others' round trips; more buys nothing and holds more claims open.
PIPELINE_DEPTH = 3
# Deletion reasons that come from expiry, the ones whose lateness (deleted_at - expires_at) is measured.
EXPIRY_REASONS = frozenset({Reason.TTL.value, Reason.RETENTION.value})


def backoff_seconds(attempts: int) -> int:
    """Seconds before the next try after `attempts` failures (1 -> 30 s, 2 -> 60 s, ...)."""
    return min(BACKOFF_BASE_SECONDS * 2 ** max(attempts - 1, 0), BACKOFF_CAP_SECONDS)


def retry_in_seconds(item: "ClaimedItem", result: DeleteResult, now: datetime) -> int:
    """When a failed delete is tried again: at the retain-until date of a version under Object Lock retention
    (a date the database clock already passed gets the ordinary backoff, so it is never retried in a tight
    loop); the capped backoff for a legal hold, which has no date; the exponential backoff for anything else."""
    if result.lock_reason == "retention" and result.locked_until is not None and result.locked_until > now:
        return max(math.ceil((result.locked_until - now).total_seconds()), 1)
    if result.lock_reason == "legal_hold":
        return BACKOFF_CAP_SECONDS
    return backoff_seconds(item.attempts + 1)




class ClaimedItem(NamedTuple):
    """A claimed row, as the pipeline carries it (a named tuple: a sweep makes a hundred thousand)."""

    id: str
    storage_key: str
    size_bytes: int
    reason: str
    attempts: int
    blob_version: str | None  # the version to delete on a versioned bucket (None: every version of the key)
    token: str  # this claim's owner; finalize touches the row only while the token still matches
    # The item's derived blobs (thumbnails, previews), each (key, recorded version), read with the claim: they
    # go in the same delete call as the item's own blob.
    variants: tuple[tuple[str, str | None], ...] = ()
    variant_bytes: int = 0
    variant_org: str | None = None  # the item's org, read with its variants (None when it has none)


def delete_targets(claimed: Sequence[ClaimedItem]) -> list[tuple[str, str | None]]:
    """Every (key, version) a batch deletes, items' and their variants', for one store call: an S3 store sends one
    DeleteObjects per 1,000 of them, however they are spread over the items."""
    return [target for item in claimed for target in ((item.storage_key, item.blob_version), *item.variants)]


def item_results(claimed: Sequence[ClaimedItem], results: Sequence[DeleteResult]) -> list[DeleteResult]:
    """One result per item from the results of `delete_targets(claimed)`, in order: an item is deleted only when
    its blob and every variant's are (a missing one counts as deleted); otherwise it fails with the first
    failure, its error naming the key when it is a variant's, its lock (Object Lock) kept. `missing` is the item's
    own blob's."""
    outcome = []
    position = 0
    for item in claimed:
        mine = results[position:position + 1 + len(item.variants)]
        position += len(mine)
        failed = next((result for result in mine if not result.ok), None)
        if failed is None:
            outcome.append(mine[0])
        elif failed is mine[0]:
            outcome.append(failed)
        else:
            outcome.append(dataclasses.replace(failed, key=item.storage_key,
                                               error=f"variant {failed.key}: {failed.error or 'unknown error'}"))
    return outcome


def _settle(in_flight: deque[Future], total: "SweepCounts") -> None:
    """Wait for every batch still in flight, adding up their counts; then raise the first error any of them
    raised (a run that stops on an error still lets each batch it started finish)."""
    errors = []
    while in_flight:
        try:
            total.add(in_flight.popleft().result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after every batch settled
            errors.append(exc)
    if errors:
        raise errors[0]


class _Outcome(NamedTuple):
    """A batch's outcome as written, for the metrics and logs that follow its commit."""

    counts: "SweepCounts"
    done: list[tuple[ClaimedItem, DeleteResult]]
    failed: list[tuple[ClaimedItem, DeleteResult]]
    lateness: list[float]


@dataclass
class SweepCounts:
    claimed: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    failed: int = 0
    locked: int = 0  # of `failed`: refused because the version is locked (Object Lock)
    held_skipped: int = 0
    already_missing: int = 0
    variants_deleted: int = 0  # derived blobs deleted with their items
    batches: int = 0
    # Dry runs only: how many items and bytes are due now, and the first of them by name.
    due: int | None = None
    due_bytes: int | None = None
    would_delete: list[dict] | None = field(default=None)
    # Real runs: the latest any item went after its expiry, in seconds (None when none went by expiry).
    late_max_s: float | None = None

    def add(self, other: "SweepCounts") -> None:
        for name in ("claimed", "deleted", "bytes_freed", "failed", "locked", "already_missing", "variants_deleted", "batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.late_max_s is not None:
            self.late_max_s = max(other.late_max_s, self.late_max_s or 0.0)

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


class Sweeper:
    """Runs the claim -> delete -> finalize pipeline for sweeps and purges against one DB and store."""

    def __init__(self, db: Database, store: BlobStore, *, claim_lease: timedelta, batch_size: int = 1000,
                 binding: StoreBinding | None = None, one_transaction: bool | None = None):
        self.db = db
        # Expiry sweeps run each batch in one transaction (pick locked, delete, tombstone, commit) on PostgreSQL,
        # whose row locks keep the batch from everyone else while its blobs go; SQLite keeps the two-phase claim,
        # since its one write lock would block every registration for as long as the store takes. None: by
        # database. Purges are two-phase everywhere (they delete media that has not expired: the claim must
        # commit, and lookups answer 404, before a byte goes).
        self.one_transaction = db.sql.postgresql if one_transaction is None else one_transaction
        self.store = store
        # Sweeps act only on a store bound to this catalog (binding an unmarked one when that is plainly right).
        self.binding = binding or StoreBinding(db, store)
        self.lease_seconds = int(claim_lease.total_seconds())
        self.batch_size = batch_size
        # Who the audit trail names for deletions this process finalizes.
        self.actor = f"sweeper@{socket.gethostname()}"[:128]
        # The claims (worker/items/claims.py), built once for this database and lease.
        self._claims = items_sql.Claims(db.sql, lease_seconds=self.lease_seconds)

    # -- claim ---------------------------------------------------------------------------------

    def _claimed(self, session, rows, token: str) -> list[ClaimedItem]:
        """The claimed rows with their variants, read in the claim's transaction: a variant added to the item
        committed before the claim (adding one locks the item row and refuses an item no longer active)."""
        # Only items marked `has_variants` (set with their first variant's insert) are looked up: a batch
        # without variants, nearly every batch, costs no query.
        flagged = [row[0] for row in rows if row[-1]]
        variants = items_sql.variants_of(session, self.db.sql, flagged) if flagged else {}
        claimed = []
        for row in rows:  # the claim returns ClaimedItem's first columns, in order, then `has_variants`
            own = variants.get(row[0], ())
            claimed.append(ClaimedItem(*row[:-1], token, tuple((v.storage_key, v.blob_version) for v in own),
                                       sum(v.size_bytes for v in own), own[0].org_id if own else None))
        return claimed

    def _claim(self, claim: Callable[..., list], *params) -> list[ClaimedItem]:
        token = secrets.token_hex(16)
        with self.db.transaction() as session:
            rows = claim(session, token, *params)
            return self._claimed(session, rows, token)

    def claim_expired(self, limit: int) -> list[ClaimedItem]:
        """Claim up to `limit` items: first stale claims whose lease ran out, then expired active items,
        both in one transaction under one claim token."""
        token = secrets.token_hex(16)
        with self.db.transaction() as session:
            rows = self._claims.stale(session, token, limit)
            if len(rows) < limit:
                rows += self._claims.expired(session, token, limit - len(rows))
            return self._claimed(session, rows, token)

    def claim_ids(self, ids: Sequence[str], reason: Reason) -> list[ClaimedItem]:
        """Claim the named active, unheld items for a purge (waiting for, not skipping, locked rows)."""
        return self._claim(self._claims.named, ids, reason)

    def claim_org(self, org_id: str, limit: int) -> list[ClaimedItem]:
        return self._claim(self._claims.org, org_id, limit)

    def seconds_until_due(self) -> float | None:
        """Seconds (by the database clock) until the next item becomes claimable: the earliest expiry of
        a claimable item or lease of a claimed one; 0 or less when one is due now, None when nothing is
        pending. Two reads of the first entry of the claim's own partial indexes: cheap enough to ask
        every second, which is how the expiry watch (worker/watch.py) knows when to wake."""
        with self.db.transaction() as session:
            now, expiry, lease = items_sql.next_due(session)
        pending = [moment for moment in (expiry, lease) if moment is not None]
        if not pending:
            return None
        # Both ends come from the database, so the answer is a duration whatever the worker's clock says.
        return (min(pending) - now).total_seconds()

    # -- delete and finalize -------------------------------------------------------------------

    def finalize_batch(self, claimed: Sequence[ClaimedItem], results: Sequence[DeleteResult]) -> SweepCounts:
        """Record the outcome of one batch in one transaction; only rows still under our claim change."""
        with self.db.transaction() as session:
            # No need to wait for the WAL flush: a finalize lost in a database crash leaves its rows
            # `deleting`, and the next sweep re-claims them after the lease and finishes them (a
            # missing blob counts as deleted). Claims stay synchronous: they must outlive a crash.
            self.db.sql.relax_commit(session)
            outcome = self._record(session, claimed, results, token=None)
        return self._report(outcome)

    def _record(self, session, claimed: Sequence[ClaimedItem], results: Sequence[DeleteResult], *,
                token: str | None) -> "_Outcome":
        """Write a batch's outcome in `session`: successes become tombstones, failures stay (or become)
        `deleting` with their error and a backoff lease, and the audit trail gets the deletions by org and
        reason. Two-phase (`token` None): only rows still under each item's own claim token change. One
        transaction (`token` given): the rows are this transaction's, locked since the pick; failures
        are claimed under `token`."""
        counts = SweepCounts(claimed=len(claimed), batches=1)
        done = [(item, result) for item, result in zip(claimed, results, strict=True) if result.ok]
        failed = [(item, result) for item, result in zip(claimed, results, strict=True) if not result.ok]
        lateness: list[float] = []
        if done:
            # Set-based: one statement for the batch (two-phase: one per claim token; a batch holds one, a
            # purge's batch may hold more): a statement per row made finalizing cost as much as the delete.
            if token is None:
                ids_by_token: dict[str, list[str]] = {}
                for item, _ in done:
                    ids_by_token.setdefault(item.token, []).append(item.id)
                groups = [group for tok, ids in ids_by_token.items()
                          for group in items_sql.tombstone_claimed(session, self.db.sql, tok, ids)]
            else:
                groups = items_sql.tombstone_locked(session, self.db.sql, [item.id for item, _ in done])
            # The rows this statement really tombstoned, for the audit trail.
            tombstoned: Counter[tuple[str, str]] = Counter()
            tombstoned_bytes: Counter[tuple[str, str]] = Counter()
            for group in groups:
                counts.deleted += group.count
                tombstoned[(group.org_id, group.reason)] += group.count
                tombstoned_bytes[(group.org_id, group.reason)] += group.size_bytes
                if group.reason in EXPIRY_REASONS:
                    lateness += group.lateness
            counts.already_missing = sum(1 for _, result in done if result.missing)
            counts.bytes_freed = sum(item.size_bytes for item, result in done if not result.missing)
            counts.bytes_freed += sum(item.variant_bytes for item, _ in done)
            counts.variants_deleted = sum(len(item.variants) for item, _ in done)
            # Counts by org and reason, in the outcome's own transaction: the trail records exactly the
            # deletions that committed (an outcome lost in a crash loses its audit rows with it, and the
            # sweep that finishes those items records them then).
            if tombstoned:
                # Variants deleted with the items, per org and reason (an item with variants knows its org).
                variants: Counter[tuple[str, str]] = Counter()
                for item, _ in done:
                    if item.variants:
                        variants[item.variant_org, item.reason] += len(item.variants)
                session.execute(insert(AuditEvent.__table__), [
                    {"action": "deleted", "actor": self.actor, "org_id": org_id, "reason": reason,
                     "details": {"count": count, "bytes": tombstoned_bytes[(org_id, reason)],
                                 **({"variants": variants[org_id, reason]} if variants[org_id, reason] else {})}}
                    for (org_id, reason), count in sorted(tombstoned.items())
                ])
        if failed:
            # The wall clock: in one transaction the store call came after the transaction began.
            now = session.scalar(select(db_clock()))
            if token is None:
                items_sql.lock_claimed(session, [
                    (item.id, item.token, (result.error or "unknown error")[:2000], retry_in_seconds(item, result, now),
                     result.lock_reason, result.locked_until)
                    for item, result in failed
                ])
            else:
                items_sql.fail_locked(session, token, [
                    (item.id, (result.error or "unknown error")[:2000], retry_in_seconds(item, result, now),
                     result.lock_reason, result.locked_until)
                    for item, result in failed
                ])
            counts.failed = len(failed)
            counts.locked = sum(1 for _, result in failed if result.lock_reason)
        return _Outcome(counts, done, failed, lateness)

    def _report(self, outcome: "_Outcome") -> SweepCounts:
        """Metrics and log lines of a batch's outcome, once it committed."""
        counts, done, failed, lateness = outcome
        for reason, count in Counter(item.reason for item, _ in done).items():
            metrics.DELETED_ITEMS.labels(reason=reason).inc(count)
        metrics.FREED_BYTES.inc(counts.bytes_freed)
        metrics.DELETE_FAILURES.inc(counts.failed)
        metrics.observe_lateness(lateness)
        if lateness:
            counts.late_max_s = max(lateness)
        for item, result in failed:
            if result.lock_reason:
                log.warning("sweep.delete_locked", media_id=item.id, key=item.storage_key, version=item.blob_version,
                            lock_reason=result.lock_reason,
                            locked_until=result.locked_until.isoformat() if result.locked_until else None)
                continue
            log.warning(
                "sweep.delete_failed",
                media_id=item.id,
                key=item.storage_key,
                attempts=item.attempts + 1,
                retry_in_s=backoff_seconds(item.attempts + 1),
                error=result.error,
            )
        return counts

    def process(self, claimed: Sequence[ClaimedItem]) -> SweepCounts:
        return self.finalize_batch(claimed, item_results(claimed, self.store.delete_targets(delete_targets(claimed))))

    # -- whole runs ----------------------------------------------------------------------------

    def _drain(self, claim: Callable[[int], list[ClaimedItem]], limit: int | None, deadline: float | None, event: str,
               stop: threading.Event | None = None, quiet: bool = False, **fields) -> SweepCounts:
        """Claim, delete and finalize batch after batch until none is due, `limit`, `deadline` or `stop`.

        A pipeline of three stages, each on its own thread and (for the database) its own connection:
        this thread claims, a deleter removes the blobs, a finalizer records them. While one batch's
        blobs are being deleted the next is claimed and the previous finalized, so the run goes at the
        pace of its slowest stage instead of the sum of all three. Each claim commits before its blobs
        are touched, and a batch is finalized only once its deletes have answered.
        """
        total = SweepCounts()
        claimed_count = 0
        in_flight: deque[Future] = deque()
        context = contextvars.copy_context  # the store's and finalizer's log events keep the task's bound fields
        with ThreadPoolExecutor(PIPELINE_DEPTH - 1, thread_name_prefix="sweep-delete") as deleter, \
                ThreadPoolExecutor(1, thread_name_prefix="sweep-finalize") as finalizer:
            try:
                while True:
                    if limit is not None and claimed_count >= limit:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        log.info(f"{event}.deadline_reached", **fields, claimed=claimed_count)
                        break
                    if stop is not None and stop.is_set():
                        break
                    while len(in_flight) >= PIPELINE_DEPTH:
                        total.add(in_flight.popleft().result())
                    size = self.batch_size if limit is None else min(self.batch_size, limit - claimed_count)
                    claimed = claim(size)
                    claimed_count += len(claimed)
                    if claimed:
                        started = time.monotonic()
                        deleting = deleter.submit(context().run, self.store.delete_targets, delete_targets(claimed))
                        in_flight.append(finalizer.submit(context().run, self._finish_batch, claimed, deleting, started,
                                                          event, quiet, fields))
                    if len(claimed) < size:
                        break  # a short batch: nothing more was due when it was claimed
            finally:
                # Batches already claimed are deleted and finalized even when the run stops on an error:
                # their claims are committed, and leaving them to the lease would only delay them.
                _settle(in_flight, total)
        return total

    def _finish_batch(self, claimed: list[ClaimedItem], deleting: Future, started: float, event: str, quiet: bool,
                      fields: dict) -> SweepCounts:
        """The finalizer's part: wait for the batch's deletes, record them, log the batch (at debug level
        when `quiet`: the expiry watch finalizes many small batches and logs a summary instead)."""
        results = self._delete_results(claimed, deleting.result, event, fields)
        batch = self.finalize_batch(claimed, results)
        self._log_batch(event, quiet, fields, batch, started)
        return batch

    @staticmethod
    def _log_batch(event: str, quiet: bool, fields: dict, batch: SweepCounts, started: float) -> None:
        (log.debug if quiet else log.info)(
            f"{event}.batch_finalized",
            **fields,
            claimed=batch.claimed,
            deleted=batch.deleted,
            failed=batch.failed,
            already_missing=batch.already_missing,
            bytes_freed=batch.bytes_freed,
            seconds=round(time.monotonic() - started, 3),
        )

    def _delete_results(self, claimed: Sequence[ClaimedItem], delete: Callable[[], list[DeleteResult]], event: str,
                        fields: dict) -> list[DeleteResult]:
        """One result per item from `delete()` (the batch's store call, or the wait for it)."""
        try:
            return item_results(claimed, delete())
        except Exception as exc:  # noqa: BLE001 - a store that raises fails its batch, it does not lose it
            # Stores answer per key; one that raises instead (a bug, an unforeseen error) fails each key
            # of the batch, so the items get the same retry with backoff and show up as stuck with it.
            error = f"{type(exc).__name__}: {exc}"
            log.error(f"{event}.batch_delete_failed", **fields, items=len(claimed), error=error)
            return [DeleteResult(item.storage_key, ok=False, error=error) for item in claimed]

    # -- expiry sweeps in one transaction a batch (PostgreSQL) ---------------------------------

    def _drain_locked(self, limit: int | None, deadline: float | None, stop: threading.Event | None,
                      quiet: bool) -> SweepCounts:
        """`drain` with each batch in one transaction: up to PIPELINE_DEPTH batches at once, each on a thread
        and connection of its own (`expire_batch`), so one batch's store I/O overlaps the others' catalog work.
        Batches are picked one after the other: this thread starts the next only once the last one has picked
        (a short pick means nothing more is due), as `_drain` claims."""
        total = SweepCounts()
        picked_count = 0
        in_flight: deque[Future] = deque()
        context = contextvars.copy_context  # the batch's log events keep the task's bound fields
        with ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="sweep-batch") as batches:
            try:
                while True:
                    if limit is not None and picked_count >= limit:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        log.info("sweep.deadline_reached", claimed=picked_count)
                        break
                    if stop is not None and stop.is_set():
                        break
                    while len(in_flight) >= PIPELINE_DEPTH:
                        total.add(in_flight.popleft().result())
                    size = self.batch_size if limit is None else min(self.batch_size, limit - picked_count)
                    picked: Future = Future()
                    in_flight.append(batches.submit(context().run, self.expire_batch, size, picked, quiet))
                    count = picked.result()
                    picked_count += count
                    if count < size:
                        break  # a short batch: nothing more was due when it was picked
            finally:
                # Every batch started runs to its commit (or rollback) before the run ends or raises.
                _settle(in_flight, total)
        return total

    def expire_batch(self, size: int, picked: Future | None = None, quiet: bool = False) -> SweepCounts:
        """One batch of an expiry sweep in one transaction: lock up to `size` due rows (stale claims first, then
        expired items; FOR UPDATE SKIP LOCKED, cut off by the transaction's `now()`), read their variants after
        the lock, delete their blobs while the locks are held, then write each row once (tombstone, or
        `deleting` with a backoff for a failed delete) with the audit rows, and commit. `picked` learns how many
        rows were locked as soon as they are.

        Why no claim commits first: an expired, unheld item answers 404 on every lookup path from its expiry,
        whatever its row's state, so there is nothing a committed claim would hide. A crash before the commit
        leaves the rows as they were (active, expired: still 404) and the next sweep takes them at once, a blob
        already gone counting as deleted. Whoever wants one of these rows meanwhile (a hold, `org set`, a variant
        add, a purge) waits on its lock and re-checks it after the commit: it finds a tombstone, or, if the
        batch rolled back, the active row it would have found before."""
        started = time.monotonic()
        token = secrets.token_hex(16)  # names this batch's failed deletes, kept `deleting`
        try:
            with self.db.transaction() as session:
                # The commit's WAL flush is not awaited: a commit lost in a database crash leaves the rows active
                # and expired, which the next sweep takes again (the blobs already gone count as deleted).
                self.db.sql.relax_commit(session)
                rows = self._claims.lock_stale(session, size)
                if len(rows) < size:
                    rows += self._claims.lock_expired(session, size - len(rows))
                claimed = self._claimed(session, rows, token)
                if picked is not None:
                    picked.set_result(len(claimed))
                    picked = None
                if not claimed:
                    return SweepCounts()
                results = self._delete_results(
                    claimed, lambda: self.store.delete_targets(delete_targets(claimed)), "sweep", {})
                outcome = self._record(session, claimed, results, token=token)
        except BaseException as exc:
            if picked is not None:
                picked.set_exception(exc)
            raise
        batch = self._report(outcome)
        self._log_batch("sweep", quiet, {}, batch, started)
        return batch

    def held_expired_count(self) -> int:
        """Expired active items a sweep leaves alone because they or their org are on hold."""
        with self.db.transaction() as session:
            return items_sql.held_expired_count(session)

    def drain(self, *, limit: int | None = None, deadline: float | None = None, stop: threading.Event | None = None,
              quiet: bool = False) -> SweepCounts:
        """Claim and delete due items batch by batch until none are left, `limit`, `deadline` or `stop`."""
        self.binding.ensure()
        if self.one_transaction:
            return self._drain_locked(limit, deadline, stop, quiet)
        return self._drain(self.claim_expired, limit, deadline, "sweep", stop, quiet)

    def sweep(self, *, limit: int | None = None, dry_run: bool = False, deadline: float | None = None) -> SweepCounts:
        """Delete every expired, unheld item (up to `limit`); with `dry_run`, only report them."""
        if dry_run:
            return self.preview(limit)
        started = time.monotonic()
        counts = self.drain(limit=limit, deadline=deadline)
        counts.held_skipped = self.held_expired_count()
        log.info("sweep.finished", **counts.to_dict(), seconds=round(time.monotonic() - started, 3))
        return counts

    def preview(self, limit: int | None = None) -> SweepCounts:
        """What a sweep would delete now, without claiming anything."""
        shown = min(limit or DRY_RUN_LISTING, DRY_RUN_LISTING)
        with self.db.transaction() as session:
            total, total_bytes, rows = items_sql.due_preview(session, shown, limit)
        counts = SweepCounts(held_skipped=self.held_expired_count())
        counts.due, counts.due_bytes = total, int(total_bytes)
        counts.would_delete = [
            {
                "id": row.id,
                "org": row.org_id,
                "key": row.storage_key,
                "size": row.size_bytes,
                "expires_at": row.expires_at.isoformat(),
                "reason": Reason.TTL.value if row.ttl_seconds else Reason.RETENTION.value,
            }
            for row in rows
        ]
        return counts

    def purge_ids(self, ids: Sequence[str], *, reason: Reason = Reason.PURGE, taken: set[str] | None = None) -> SweepCounts:
        """Delete the named items that are still active and unheld; adds the IDs its claims took to `taken`."""
        counts = SweepCounts()
        for start in range(0, len(ids), self.batch_size):
            claimed = self.claim_ids(ids[start : start + self.batch_size], reason)
            if taken is not None:
                taken.update(item.id for item in claimed)
            if claimed:
                counts.add(self.process(claimed))
        log.info("purge.finished", scope="ids", **counts.to_dict())
        return counts

    def purge_org(self, org_id: str, *, deadline: float | None = None, taken: set[str] | None = None) -> SweepCounts:
        """Delete the org's active, unheld items; adds the IDs its claims took to `taken`."""

        def claim(size: int) -> list[ClaimedItem]:
            claimed = self.claim_org(org_id, size)
            if taken is not None:
                taken.update(item.id for item in claimed)
            return claimed

        counts = self._drain(claim, None, deadline, "purge", org=org_id)
        log.info("purge.finished", scope="org", org=org_id, **counts.to_dict())
        return counts
