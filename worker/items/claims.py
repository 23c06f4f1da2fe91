"""The claim, written once: one `UPDATE ... RETURNING` moves a batch of rows to `deleting` under a claim
token and a lease, its cutoff the database's clock.

SQL text rather than Core: the statement every invariant of the sweep rests on reads best as the SQL
it is. The two things the databases spell differently come from `worker/dialect.py`: PostgreSQL picks
the rows FOR UPDATE (SKIP LOCKED for sweeps), so concurrent sweepers take disjoint batches, and joins
them to the UPDATE under an alias; SQLite has one writer at a time (BEGIN IMMEDIATE), so its claim is
exclusive without row locks, and its UPDATE has no alias.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import BigInteger, Boolean, Integer, String, bindparam, text

from worker import models
from worker.db import db_now
from worker.dialect import Dialect
from worker.items.predicates import CLAIMABLE, DELETING, LIVE, predicate

# Evaluated on the updated row (`{m}`: `m.` on PostgreSQL, bare on SQLite).
REASON_BY_TTL = "CASE WHEN {m}ttl_seconds IS NULL THEN 'retention' ELSE 'ttl' END"

# The rows a claim takes: those of `media_items AS c` matching {where}, first by {order} (any order when none),
# at most :limit.
_PICK = """SELECT c.id FROM media_items AS c
    WHERE {where}
    {order}LIMIT :limit
    {lock}"""

_CLAIM = """
UPDATE {target}
SET state = 'deleting',
    deletion_reason = COALESCE({m}deletion_reason, {reason}),
    claim_token = :token,
    claimed_at = COALESCE({m}claimed_at, {now}),
    lease_until = {lease}
{picked}
RETURNING {m}id, {m}storage_key, {m}size_bytes, {m}deletion_reason, {m}attempts, {m}blob_version, {m}has_variants
"""

# The one-transaction sweep's pick (PostgreSQL): the same rows, index and order as the claim, locked FOR UPDATE
# SKIP LOCKED and only read. Nothing is written until the batch's blobs are gone; the row locks held until
# then are what a hold, an `org set` or a variant add waits on. The reason is the one the row will be
# tombstoned with (a stale claim keeps the one it was claimed for).
_LOCK = """SELECT c.id, c.storage_key, c.size_bytes, COALESCE(c.deletion_reason, {reason}) AS deletion_reason,
    c.attempts, c.blob_version, c.has_variants
FROM media_items AS c
WHERE {where}
ORDER BY {order} LIMIT :limit
{lock}"""

_RETURNED = dict(id=String, storage_key=String, size_bytes=BigInteger, deletion_reason=String, attempts=Integer,
                 blob_version=String, has_variants=Boolean)


def claim_sql(dialect: Dialect, *, where: str, order: str | None, reason: str, now: str, lease: str,
              skip_locked: bool) -> str:
    """The claim's SQL for `dialect`: rows of `media_items AS c` matching `where` (may name `{now}`), in
    `order` (None: whichever rows the plan finds first), moved to `deleting` with `reason` (may name `{m}`
    columns of the updated row) and a lease until `lease`."""
    m = dialect.update_alias("m")
    picked = _PICK.format(where=where.format(now=now), order=f"ORDER BY {order} " if order else "",
                          lock=dialect.row_lock(skip_locked=skip_locked))
    return _CLAIM.format(target=dialect.update_target("media_items", "m"), m=m, reason=reason.format(m=m), now=now,
                         lease=lease, picked=dialect.update_picked("m", picked))


class Claims:
    """The claims of sweeps and purges on one database with one lease, built once. Each runs in the
    caller's transaction under the caller's claim token and returns the rows it claimed (`id`,
    `storage_key`, `size_bytes`, `deletion_reason`, `attempts`, `blob_version`, `has_variants`)."""

    def __init__(self, dialect: Dialect, *, lease_seconds: int):
        self.dialect = dialect
        self._now = dialect.compile(db_now())
        self._lease = dialect.compile(db_now(lease_seconds))
        # The sweep's two picks (stale claims, expired items), each spelling its partial index's predicate exactly
        # as the index does, so the planner uses it. Written once: the two-phase claims and the one-transaction
        # sweep's locks (PostgreSQL) take exactly the same rows.
        stale = (f"{predicate(DELETING, 'c')} AND c.lease_until <= {{now}}", "c.lease_until")
        expired = (f"{predicate(CLAIMABLE, 'c')} AND c.expires_at <= {{now}}", "c.expires_at")
        self.stale_statement = self._statement(*stale, REASON_BY_TTL)
        self.expired_statement = self._statement(*expired, REASON_BY_TTL)
        self.stale_lock_statement = self._lock_statement(*stale)
        self.expired_lock_statement = self._lock_statement(*expired)
        # An org purge takes every claimable item of the org whatever its expiry, so it asks for no order: read by
        # the org index of live rows (LIVE spelled as that index is). Ordered by expiry under a LIMIT, the planner
        # walked the claimable index of every org from its head, filtering by org (the whole index for a small org).
        self._org_statement = self._statement(f"c.org_id = :org AND {predicate(LIVE, 'c')} AND {predicate(CLAIMABLE, 'c')}",
                                              None, f"'{models.Reason.ORG_PURGE.value}'")

    def _statement(self, where: str, order: str | None, reason: str, *, skip_locked: bool = True, ids: bool = False):
        sql = claim_sql(self.dialect, where=where, order=order, reason=reason, now=self._now, lease=self._lease,
                        skip_locked=skip_locked)
        statement = text(sql).columns(**_RETURNED)
        return statement.bindparams(bindparam("ids", expanding=True)) if ids else statement

    def _lock_statement(self, where: str, order: str):
        sql = _LOCK.format(where=where.format(now=self._now), order=order, reason=REASON_BY_TTL.format(m="c."),
                           lock=self.dialect.row_lock(skip_locked=True))
        return text(sql).columns(**_RETURNED)

    def lock_stale(self, session, limit: int) -> list:
        """Claims whose lease ran out, by lease, locked (SKIP LOCKED) in the caller's transaction and not
        written: the one-transaction sweep's pick. Same rows as `stale`."""
        return session.execute(self.stale_lock_statement, {"limit": limit}).all()

    def lock_expired(self, session, limit: int) -> list:
        """Claimable items expired by the database clock (the transaction's `now()`), by expiry, locked (SKIP
        LOCKED) in the caller's transaction and not written: the one-transaction sweep's pick. Same rows as
        `expired`; a hold or retention change committed before the lock is re-checked on the row's newest
        version (PostgreSQL keeps every condition of a FOR UPDATE scan for that re-check, partial index or not)."""
        return session.execute(self.expired_lock_statement, {"limit": limit}).all()

    def stale(self, session, token: str, limit: int) -> list:
        """Claims whose lease ran out (a worker died or was too slow), by lease, skipping locked rows."""
        return session.execute(self.stale_statement, {"token": token, "limit": limit}).all()

    def expired(self, session, token: str, limit: int) -> list:
        """Claimable items expired by the database clock, by expiry, skipping locked rows."""
        return session.execute(self.expired_statement, {"token": token, "limit": limit}).all()

    def named(self, session, token: str, ids: Sequence[str], reason) -> list:
        """The named active, unheld items, regardless of expiry (a purge): waits for locked rows
        instead of skipping them."""
        statement = self._statement(f"c.id IN :ids AND {predicate(CLAIMABLE, 'c')}", "c.id",
                                    f"'{models.Reason(reason).value}'", skip_locked=False, ids=True)
        return session.execute(statement, {"token": token, "limit": len(ids), "ids": list(ids)}).all()

    def org(self, session, token: str, org_id: str, limit: int) -> list:
        """An org's active, unheld items, regardless of expiry (an org purge), in no particular order."""
        return session.execute(self._org_statement, {"token": token, "limit": limit, "org": org_id}).all()
