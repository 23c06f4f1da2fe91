"""Measuring the media store: the store says how full it is (`BlobStore.usage()`, a filesystem's
`statvfs`); an object store, which has no size of its own, is measured as the catalog's live media
against a configured capacity. No code here asks what type a store is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from worker import items as items_sql
from worker.db import Database
from worker.volume.levels import Usage

if TYPE_CHECKING:
    from worker.store import BlobStore


def live_media_bytes(db: Database) -> int:
    """Bytes of media that still has a blob: active items and items being deleted."""
    with db.transaction() as session:
        return items_sql.live_bytes(session)


def store_usage(db: Database, store: BlobStore, *, capacity_bytes: int | None) -> Callable[[], Usage]:
    """How to measure a store: what it says of itself (a filesystem's `statvfs`), else, for an
    object store, the catalog's live bytes against the configured capacity."""

    def measure() -> Usage:
        usage = store.usage()
        return usage if usage is not None else Usage(used_bytes=live_media_bytes(db), total_bytes=capacity_bytes)

    return measure
