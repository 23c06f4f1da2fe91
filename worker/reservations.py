"""Key reservations: the catalog's arbitration of every blob write and delete outside the sweep.

A blob is written, adopted or deleted only by whoever holds its storage key in the catalog at that moment,
never on a belief held a moment earlier ("I wrote it", "no row pointed at it", "its name says temp"):

- a sweep or a purge holds the key through the item's claim (its row `deleting` under the claim token);
- a registration (`register`, a manifest's batch, `adopt`) holds it through a reservation, committed before a
  byte is written or adopted under the key and consumed in the transaction that inserts the item's row (a
  row is only ever inserted by the holder of its key's reservation). It removes a blob it wrote only while it
  still holds the reservation, with the reservation row locked, so the loser of a race never deletes a blob
  that another registration of the same key adopted;
- reconcile holds it through a reservation taken in the transaction that deletes the blob (never committed),
  and reads the key's rows again after taking it: a registration of that key waits for that transaction and
  then finds the blob gone, or committed first and made the key live, which reconcile then sees.

Takeovers: a registration takes over any reservation of its key: re-running a registration a crash cut short
must succeed, and when two registrations of one key race, the first to consume its reservation wins while the
other can no longer delete anything. `adopt` never takes one over (a reserved key is a registration in flight).
Reconcile takes over only reservations older than its grace (their holder died) and drops the stale ones it
finds at the end of a run. Locks are always taken in key order, so two holders never deadlock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Literal

import structlog
from sqlalchemy import bindparam, delete, func, select, text

from config.errors import BadInput
from worker.db import Database, UTCDateTime, db_now
from worker.dialect import Dialect
from worker.models import KeyReservation
from worker.store import BlobStore, chunked

log = structlog.get_logger("worker.reservations")

# Keys per statement that names them: a manifest's batch (2,000 lines) in one, on PostgreSQL as one array
# parameter; on SQLite well inside its limit of bound parameters.
RESERVE_CHUNK = 2000

_table = KeyReservation.__table__


class ReservationLost(BadInput):
    """Another registration took over a key this one had reserved: this one changed nothing."""


def reserve(session, dialect: Dialect, token: str, purpose: str, keys: Mapping[str, str | None], *,
            take_over: Literal["any", "none"] | datetime) -> set[str]:
    """Reserve `keys` (key -> media ID, or None) under `token` in the session's transaction, in key order, and
    return those now held by it. `take_over`: "any" takes over every other holder's reservation (a
    registration), "none" leaves them (adopt), a time takes over only those reserved at or before it (reconcile:
    holders that died). On PostgreSQL a key another transaction is reserving or consuming right now is waited
    for; on SQLite write transactions never overlap. One statement, the batch as one parameter a column."""
    if not keys:
        return set()
    source, params = dialect.rows_of(["storage_key", "media_id"], [(key, keys[key]) for key in sorted(keys)])
    if take_over == "none":
        conflict = "DO NOTHING"
    else:
        conflict = ("DO UPDATE SET token = excluded.token, purpose = excluded.purpose, media_id = excluded.media_id, "
                    "reserved_at = excluded.reserved_at")
        if take_over != "any":
            conflict += " WHERE key_reservations.reserved_at <= :stale_before"
            params["stale_before"] = take_over
    # WHERE true: SQLite's parser needs it between an INSERT's SELECT and its ON CONFLICT.
    statement = text(
        f"INSERT INTO key_reservations (storage_key, token, purpose, media_id, reserved_at) "
        f"SELECT rows.storage_key, :token, :purpose, rows.media_id, {dialect.compile(db_now())} FROM {source} "
        f"WHERE true ORDER BY rows.storage_key "
        f"ON CONFLICT (storage_key) {conflict} RETURNING storage_key"
    )
    if "stale_before" in params:
        statement = statement.bindparams(bindparam("stale_before", type_=UTCDateTime()))
    return set(session.scalars(statement, {"token": token, "purpose": purpose, **params}))


def locked(session, dialect: Dialect, token: str, keys: Iterable[str]) -> set[str]:
    """Those of `keys` that `token` still holds, their reservations locked (in key order) until the transaction
    ends: while they are, nobody can take them over or insert an item at those keys."""
    held: set[str] = set()
    for chunk in chunked(sorted(set(keys)), RESERVE_CHUNK):
        held.update(session.scalars(
            select(_table.c.storage_key)
            .where(_table.c.token == token, dialect.id_in(_table.c.storage_key, chunk))
            .order_by(_table.c.storage_key)
            .with_for_update()
        ))
    return held


def consume(session, dialect: Dialect, token: str, keys: Iterable[str]) -> set[str]:
    """Delete `token`'s reservations of `keys` (locked in key order first), in the transaction that inserts their
    items; returns the keys it still held (the caller inserts rows only for those, or none when one is missing).
    One statement a chunk: the deleted rows come back."""
    held: set[str] = set()
    for chunk in chunked(sorted(set(keys)), RESERVE_CHUNK):
        mine = (select(_table.c.storage_key)
                .where(_table.c.token == token, dialect.id_in(_table.c.storage_key, chunk))
                .order_by(_table.c.storage_key).with_for_update())
        held.update(session.scalars(delete(_table).where(_table.c.storage_key.in_(mine.scalar_subquery()))
                                    .returning(_table.c.storage_key)))
    return held


def drop(session, token: str) -> None:
    """Forget every reservation `token` holds."""
    session.execute(delete(_table).where(_table.c.token == token))


def holders(session, dialect: Dialect, keys: list[str]) -> dict[str, datetime]:
    """The reserved ones of `keys` and when each was reserved."""
    if not keys:
        return {}
    return dict(session.execute(select(_table.c.storage_key, _table.c.reserved_at)
                                .where(dialect.id_in(_table.c.storage_key, keys))).all())


def drop_stale(session, before: datetime) -> int:
    """Remove reservations made at or before `before` (their holders died or gave up long ago); returns how many.
    A holder still alive then fails to consume its reservation and, holding nothing, deletes nothing."""
    return session.execute(delete(_table).where(_table.c.reserved_at <= before)).rowcount


def count_stale(session, before: datetime) -> int:
    return session.scalar(select(func.count()).select_from(_table).where(_table.c.reserved_at <= before)) or 0


def release(db: Database, store: BlobStore, token: str, keys: Iterable[str], written: Iterable[str]) -> list[str]:
    """A registration that failed gives its keys back. Of the blobs it wrote (`written`), it removes only those
    whose reservation it still holds, with the reservations locked while the store deletes them: a key taken
    over meanwhile may already be another registration's committed blob. Returns the keys whose blobs it
    removed."""
    removed: list[str] = []
    with db.transaction() as session:
        held = locked(session, db.sql, token, keys)
        ours = [key for key in dict.fromkeys(written) if key in held]
        if ours:
            for result in store.delete_many(ours):
                if result.ok:
                    removed.append(result.key)
                else:
                    log.error("register.cleanup_failed", key=result.key, error=result.error)
        drop(session, token)
    abandoned = [key for key in dict.fromkeys(written) if key not in held]
    if abandoned:
        # Taken over: the blob is the new holder's to adopt or leave; reconcile removes it if nobody does.
        log.warning("register.blobs_left_to_new_holder", keys=abandoned[:20], count=len(abandoned))
    return removed
