"""Factories: put organizations, items and their blobs in the catalog and the store in a given state,
without going through the CLI. `seed_items` is the one place that inserts item rows in bulk."""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert, select, text, update

from worker.catalog import Catalog, Item
from worker.db import Database, db_now
from worker.models import MediaItem, MediaVariant, Organization, State
from worker.store import BlobStore
from worker.store.keys import key_for_id

_sequence = itertools.count()

# Seeded items sit far from their expiry on either side (by the database clock), so no test, however
# slow the machine or wherever a kill lands, can race the boundary.
SEEDED_TTL = timedelta(days=1)
EXPIRED_AGO = timedelta(hours=2)
# Rows per INSERT statement.
SEED_BATCH = 1000

# Where seed_items writes blobs: a filesystem root (files written straight into it, the fast way), a
# store (through put_file, the store interface), a function (key, bytes) -> None (e.g. straight into
# moto's backend: `Objects.writer`), or None for rows only.
Blobs = Path | BlobStore | Callable[[str, bytes], None] | None


def database_time(db: Database) -> datetime:
    """now() as the database clock says it."""
    with db.transaction() as session:
        return session.scalar(select(db_now()))


def db_time(catalog: Catalog) -> datetime:
    return database_time(catalog.db)


def seed_org(db: Database, org: str, retention: timedelta = timedelta(days=30)) -> None:
    """An organization row, unless the org exists already (then it is left as it is)."""
    with db.transaction() as session:
        if session.get(Organization, org) is None:
            session.execute(insert(Organization).values(id=org, retention_seconds=int(retention.total_seconds())))


def seed_items(db: Database, blobs: Blobs, org: str, count: int = 0, *, keys: Mapping[str, str] | None = None,
               expired: bool = True, held: bool = False, prefix: str = "bulk", size: int = 10) -> list[str]:
    """Active items of an existing `org`, inserted in bulk, each with a blob of `size` bytes written to
    `blobs`; returns their IDs in order. Either `count` items `<prefix>-0`, `<prefix>-1`, ... at their
    sharded keys (`key_for_id`), or exactly `keys` ({media ID: storage key}). Each has a one-day TTL and
    expired two hours ago (`expired`) or expires a day from now; `held` items carry an item hold."""
    if count and keys is not None:
        raise ValueError("give seed_items a count or keys, not both")
    if keys is None:
        keys = {f"{prefix}-{number}": key_for_id(f"{prefix}-{number}") for number in range(count)}
    write_blob = _blob_writer(blobs)
    content = b"x" * size
    for key in keys.values():
        write_blob(key, content)
    now = database_time(db)
    created = now - SEEDED_TTL - EXPIRED_AGO if expired else now
    rows = [{"id": media_id, "org_id": org, "storage_key": key, "size_bytes": size, "mime_type": "image/jpeg",
             "created_at": created, "ttl_seconds": int(SEEDED_TTL.total_seconds()), "expires_at": created + SEEDED_TTL,
             "state": State.ACTIVE.value, "held_at": now if held else None, "hold_reason": "legal" if held else None}
            for media_id, key in keys.items()]
    with db.transaction() as session:
        for start in range(0, len(rows), SEED_BATCH):
            session.execute(insert(MediaItem), rows[start:start + SEED_BATCH])
    return list(keys)


def seed_variants(db: Database, blobs: Blobs, variants: Mapping[str, list[str]], *, size: int = 7) -> None:
    """Variant rows ({item ID: [variant keys]}) of existing items, each with a blob of `size` bytes in `blobs`."""
    write_blob = _blob_writer(blobs)
    rows = []
    for media_id, keys in variants.items():
        for key in keys:
            write_blob(key, b"v" * size)
            rows.append({"storage_key": key, "item_id": media_id, "size_bytes": size, "mime_type": "image/webp"})
    with db.transaction() as session:
        for start in range(0, len(rows), SEED_BATCH):
            session.execute(insert(MediaVariant), rows[start:start + SEED_BATCH])
        session.execute(update(MediaItem).where(MediaItem.id.in_(list(variants))).values(has_variants=True))


def variant_keys(db: Database, media_id: str | None = None) -> set[str]:
    """The variant keys the catalog holds (of one item, or of all)."""
    statement = select(MediaVariant.storage_key)
    if media_id is not None:
        statement = statement.where(MediaVariant.item_id == media_id)
    with db.transaction() as session:
        return set(session.scalars(statement))


def _blob_writer(blobs: Blobs) -> Callable[[str, bytes], None]:
    if blobs is None:
        return lambda key, content: None
    if isinstance(blobs, Path):
        return lambda key, content: plant_blob(blobs, key, content)
    if isinstance(blobs, BlobStore):
        def through_the_store(key: str, content: bytes) -> None:
            with tempfile.NamedTemporaryFile() as source:
                source.write(content)
                source.flush()
                blobs.put_file(key, Path(source.name))

        return through_the_store
    return blobs


def bind_store(engine) -> None:
    """Mark the engine's store as its catalog's, whatever both hold: for tests whose catalog has rows without
    blobs (plans, benchmarks), which a real binding rightly refuses (worker/binding.py)."""
    mark_store(engine.db, engine.store)


def mark_store(db: Database, store: BlobStore) -> None:
    """Write `store`'s binding marker naming `db`'s catalog (see `bind_store`)."""
    from worker.binding import StoreBinding

    store.write_marker(json.dumps({"catalog": StoreBinding(db, store).identity()}).encode())


def make_file(directory: Path, content: bytes = b"media bytes") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"upload-{next(_sequence)}.bin"
    path.write_bytes(content)
    return path


def register_aged(catalog: Catalog, org: str, age: timedelta, *, ttl: str | None = None, media_id: str | None = None,
                  uploads: Path, content: bytes = b"media bytes", mime: str | None = None) -> Item:
    """Register a real file whose created_at lies `age` in the past (by the database clock)."""
    created = db_time(catalog) - age
    return catalog.register(org=org, file=make_file(uploads, content), media_id=media_id, ttl=ttl, created_at=created,
                            mime=mime)


def expiring_in(catalog: Catalog, org: str, seconds: float, *, uploads: Path, **options) -> Item:
    """Register a real file with a one-hour TTL that expires `seconds` from now (database clock): media a hold can
    still cover (expired is final: no hold covers an item already gone by its expiry), which `wait_past` then
    lets expire."""
    return register_aged(catalog, org, timedelta(hours=1) - timedelta(seconds=seconds), ttl="1h", uploads=uploads,
                         **options)


def wait_past(catalog: Catalog, *items: Item) -> None:
    """Wait until the database's clock has passed every item's expiry: how a held item honestly comes to be past it."""
    deadline = max(item.expires_at for item in items)
    while db_time(catalog) <= deadline:
        time.sleep(0.05)


def states(catalog: Catalog, ids: list[str]) -> dict[str, str]:
    with catalog.db.transaction() as session:
        return dict(session.execute(select(MediaItem.id, MediaItem.state).where(MediaItem.id.in_(ids))).all())


def rows_by_id(catalog: Catalog, ids) -> dict[str, MediaItem]:
    """The item rows, detached, by media ID."""
    with catalog.db.transaction() as session:
        items = session.scalars(select(MediaItem).where(MediaItem.id.in_(list(ids)))).all()
        session.expunge_all()
    return {item.id: item for item in items}


def end_leases(db: Database) -> None:
    """Let time pass for claimed items: the lease of every `deleting` row (a crashed claim's, or a failed
    delete's backoff) ends now, as it would later."""
    table = MediaItem.__table__
    with db.transaction() as session:
        session.execute(update(table).where(table.c.state == State.DELETING.value).values(lease_until=db_now(-1)))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def plant_blob(root: Path, key: str, content: bytes = b"orphan") -> Path:
    """A blob written straight into a filesystem store's root, behind the catalog's back."""
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def wait_until_older(paths: list[Path], age: timedelta, timeout: float = 30.0) -> None:
    """Wait until every file's age as the store judges it (change time, which nobody can set back
    the way `touch -d` sets the modification time) exceeds `age`."""
    deadline = time.monotonic() + timeout
    for path in paths:
        while True:
            info = path.stat()
            if time.time() - max(info.st_mtime, info.st_ctime) > age.total_seconds() + 0.05:
                break
            assert time.monotonic() < deadline, f"{path} did not age {age} within {timeout} s"
            time.sleep(0.02)


def blocked_by(db: Database, pid: int) -> bool:
    """Whether another session waits for a lock that the PostgreSQL backend `pid` holds."""
    with db.transaction() as session:
        return bool(session.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                                   {"pid": pid}))


def wait_until_blocked_by(db: Database, pid: int, timeout: float = 10.0) -> None:
    """Return once another session waits for a lock that the PostgreSQL backend `pid` holds."""
    deadline = time.monotonic() + timeout
    while not blocked_by(db, pid):
        assert time.monotonic() < deadline, f"nothing waited for the locks of backend {pid} within {timeout} s"
        time.sleep(0.02)


def fill_catalog(db: Database, count: int, *, prefix: str = "row", expired: int = 0, state: str = "active",
                 start: int = 0, orgs: int = 1, org: str = "bench", vacuum: bool = True) -> None:
    """`count` rows `<prefix>-<n>` (n from `start`) made by PostgreSQL itself, one INSERT ... SELECT from
    generate_series: a million rows in seconds, for benchmarks and plan tests. Keys are sharded as
    `key_for_id` shards them (computed in SQL, checked against it); items belong to `org`, or with
    `orgs` > 1 to `<org>-0` ... `<org>-<orgs-1>` in turn. The first `expired` expired two hours ago, the
    rest expire in thirty days; `state="deleted"` makes tombstones. No blobs: write them when needed.
    Then VACUUM ANALYZE, as a settled catalog is; `vacuum=False` only analyzes, as a catalog mid-import is
    (statistics fresh, no visibility map yet)."""
    names = [org] if orgs == 1 else [f"{org}-{number}" for number in range(orgs)]
    with db.engine.begin() as connection:
        for name in names:
            connection.execute(text("INSERT INTO organizations (id, retention_seconds) VALUES (:org, 7776000) "
                                    "ON CONFLICT DO NOTHING"), {"org": name})
        connection.execute(text("""
            INSERT INTO media_items (id, org_id, storage_key, size_bytes, mime_type, created_at, ttl_seconds,
                                     expires_at, state, org_held, attempts, deleted_at, deletion_reason)
            SELECT id, CASE WHEN CAST(:orgs AS bigint) = 1 THEN :org ELSE :org || '-' || (n % CAST(:orgs AS bigint)) END,
                   substr(h, 1, 2) || '/' || substr(h, 3, 2) || '/' || id, 1024, 'image/jpeg',
                   now() - interval '1 day', 2592000,
                   CASE WHEN n < CAST(:first_fresh AS bigint) THEN now() - interval '2 hours' ELSE now() + interval '30 days' END,
                   CAST(:state AS text), false, 0,
                   CASE WHEN CAST(:state AS text) = 'deleted' THEN now() - interval '1 hour' END,
                   CASE WHEN CAST(:state AS text) = 'deleted' THEN 'ttl' END
            FROM (SELECT n, :prefix || '-' || n AS id, encode(sha256(convert_to(:prefix || '-' || n, 'UTF8')), 'hex') AS h
                  FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS n) AS s"""),
            {"org": org, "orgs": orgs, "prefix": prefix, "first_fresh": start + expired, "state": state,
             "start": start, "stop": start + count - 1})
        first = connection.execute(text("SELECT storage_key FROM media_items WHERE id = :id"), {"id": f"{prefix}-{start}"}).scalar()
    assert first == key_for_id(f"{prefix}-{start}"), "fill_catalog's SQL shards keys unlike key_for_id"
    vacuum_analyze(db, vacuum=vacuum)


def vacuum_analyze(db: Database, *, vacuum: bool = True) -> None:
    """Statistics (and with `vacuum` the visibility map) up to date, as autovacuum keeps them."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE media_items" if vacuum else "ANALYZE media_items"))
