"""Lookup: the item while it is active, its tombstone once claimed or deleted; presigned URLs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import structlog

from worker import items as items_sql
from worker.catalog.results import Item, PresignedUrl, Tombstone
from worker.db import Database
from config.errors import BadInput, Gone, NotFound
from worker.models import State
from worker.store import BlobStore
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")


class Lookup:
    def __init__(self, db: Database, store: BlobStore, *, presign_ttl: timedelta):
        self.db = db
        self.store = store
        self.presign_ttl = presign_ttl

    def find(self, media_id: str) -> Item | Tombstone | None:
        """The item while active, its tombstone once claimed or deleted, None for an ID never registered."""
        return self._answer(media_id, org=None)

    def find_for_org(self, org: str, media_id: str) -> Item | Tombstone | None:
        """`find` as one org may see it: another org's item, live or gone, is None, exactly like an ID
        never registered, so a caller cannot even learn that it exists (the HTTP lookup's scoping)."""
        return self._answer(media_id, org=org)

    def _answer(self, media_id: str, *, org: str | None) -> Item | Tombstone | None:
        validate_id(media_id)
        with self.db.transaction() as session:
            row = items_sql.by_id(session, media_id)
        if row is None or (org is not None and row.org_id != org):
            return None
        if row.state != State.ACTIVE.value:
            return Tombstone(id=media_id, state=row.state, reason=row.deletion_reason,
                             deleted_at=row.deleted_at or row.claimed_at)
        return Item.from_row(row)

    def sign(self, key: str) -> tuple[str, datetime] | None:
        """A fresh presigned GET URL for `key` and when it expires, or None on a store without them."""
        if not self.store.can_presign:
            return None
        seconds = int(self.presign_ttl.total_seconds())
        return self.store.presigned_url(key, seconds), datetime.now(timezone.utc) + timedelta(seconds=seconds)

    def lookup(self, media_id: str) -> Item:
        """The item while active. Raises Gone (claimed or deleted; it carries the tombstone) or NotFound."""
        found = self.find(media_id)
        if found is None:
            raise NotFound(f"media id {media_id!r} was never registered.")
        if isinstance(found, Tombstone):
            raise Gone(f"media id {media_id!r} is gone ({found.reason}).", found)
        return found

    def presigned_url(self, media_id: str) -> PresignedUrl:
        """A presigned GET URL for an active item, valid for `presign_ttl`. Raises BadInput on a store
        without presigned URLs (filesystem), then Gone or NotFound exactly like `lookup`."""
        validate_id(media_id)
        if not self.store.can_presign:
            raise BadInput(f"lookup --url needs an object store (s3://...); {self.store.url} cannot hand out presigned URLs.")
        item = self.lookup(media_id)
        url, expires_at = self.sign(item.key)
        seconds = int(self.presign_ttl.total_seconds())
        log.info("media.presigned", media_id=media_id, expires_in_s=seconds)
        return PresignedUrl(id=media_id, url=url, expires_in=seconds, expires_at=expires_at)
