"""Lookup: the item while it is active and not past its expiry (or held), its tombstone otherwise;
presigned URLs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import structlog

from worker import items as items_sql
from worker.catalog.results import Item, PresignedUrl, Tombstone
from worker.db import Database
from config.errors import BadInput, Gone, NotFound
from worker.models import Reason, State
from worker.store import BlobStore
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")

# The state a lookup reports for an item past its expiry that no sweep has claimed yet: the row is still
# active, but the contract says it answers 404 from its expiry.
EXPIRED = "expired"


class Lookup:
    def __init__(self, db: Database, store: BlobStore, *, presign_ttl: timedelta):
        self.db = db
        self.store = store
        self.presign_ttl = presign_ttl

    def find(self, media_id: str) -> Item | Tombstone | None:
        """The item while active and not expired (or held), its tombstone once claimed, deleted or expired
        (database clock), None for an ID never registered."""
        return self._answer(media_id, org=None)

    def find_for_org(self, org: str, media_id: str) -> Item | Tombstone | None:
        """`find` as one org may see it: another org's item, live or gone, is None, exactly like an ID
        never registered, so a caller cannot even learn that it exists (the HTTP lookup's scoping)."""
        return self._answer(media_id, org=org)

    def _answer(self, media_id: str, *, org: str | None) -> Item | Tombstone | None:
        validate_id(media_id)
        with self.db.transaction() as session:
            found = items_sql.by_id_and_now(session, media_id)
        if found is None:
            return None
        row, now = found
        if org is not None and row.org_id != org:
            return None
        if row.state != State.ACTIVE.value:
            return Tombstone(id=media_id, state=row.state, reason=row.deletion_reason,
                             deleted_at=row.deleted_at or row.claimed_at)
        item = Item.from_row(row)
        if item.expires_at <= now and row.held_at is None and not row.org_held:
            # No sweep has claimed it yet (a backlog, workers down): it is gone from its expiry all the same.
            return _expired(item)
        return item

    def sign(self, key: str) -> tuple[str, datetime] | None:
        """A fresh presigned GET URL for `key` and when it expires, or None on a store without them."""
        if not self.store.can_presign:
            return None
        seconds = int(self.presign_ttl.total_seconds())
        return self.store.presigned_url(key, seconds), datetime.now(timezone.utc) + timedelta(seconds=seconds)

    def lookup(self, media_id: str) -> Item:
        """The item while active. Raises Gone (claimed, deleted or expired; it carries the tombstone) or NotFound."""
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


def _expired(item: Item) -> Tombstone:
    """The 404 of an item past its expiry that no sweep claimed yet: gone since its expiry, for the reason
    a sweep will record."""
    reason = Reason.RETENTION.value if item.ttl_seconds is None else Reason.TTL.value
    return Tombstone(id=item.id, state=EXPIRED, reason=reason, deleted_at=item.expires_at)
