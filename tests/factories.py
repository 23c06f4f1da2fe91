"""Row factories: put items in the catalog in a given state without going through the CLI."""

from __future__ import annotations

import itertools
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert, select

from worker.catalog import Catalog, Item
from worker.db import db_now
from worker.models import MediaItem, State
from worker.store.keys import key_for_id

_sequence = itertools.count()


def db_time(catalog: Catalog) -> datetime:
    with catalog.db.transaction() as session:
        return session.scalar(select(db_now()))


def make_file(directory: Path, content: bytes = b"media bytes") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"upload-{next(_sequence)}.bin"
    path.write_bytes(content)
    return path


def register_aged(catalog: Catalog, org: str, age: timedelta, *, ttl: str | None = None, media_id: str | None = None,
                  uploads: Path, content: bytes = b"media bytes") -> Item:
    """Register a real file whose created_at lies `age` in the past (by the database clock)."""
    created = db_time(catalog) - age
    return catalog.register(org=org, file=make_file(uploads, content), media_id=media_id, ttl=ttl, created_at=created)


def bulk_expired(catalog: Catalog, org: str, count: int, *, root: Path, prefix: str = "bulk", expired: bool = True) -> list[str]:
    """Insert `count` items with real blobs, all expired (or all one day from expiry), in one statement."""
    now = db_time(catalog)
    expires = now - timedelta(hours=1) if expired else now + timedelta(days=1)
    rows = []
    for number in range(count):
        media_id = f"{prefix}-{number}"
        key = key_for_id(media_id)
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
        rows.append({"id": media_id, "org_id": org, "storage_key": key, "size_bytes": 10, "mime_type": "image/jpeg",
                     "created_at": expires - timedelta(hours=2), "ttl_seconds": 7200, "expires_at": expires,
                     "state": State.ACTIVE.value})
    with catalog.db.transaction() as session:
        session.execute(insert(MediaItem), rows)
    return [row["id"] for row in rows]


def states(catalog: Catalog, ids: list[str]) -> dict[str, str]:
    with catalog.db.transaction() as session:
        return dict(session.execute(select(MediaItem.id, MediaItem.state).where(MediaItem.id.in_(ids))).all())


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
