"""Lookup: the item while it is active and not past its expiry (or held), its tombstone otherwise;
presigned URLs that never outlive the item."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select

from worker import items as items_sql
from worker.catalog.results import Item, PresignedUrl, Tombstone, Variant
from worker.db import Database, db_now
from config.errors import BadInput, Gone, NotFound
from worker.models import Reason, State
from worker.store import BlobStore
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")

# The state a lookup reports for an item past its expiry that no sweep has claimed yet: the row is still
# active, but the contract says it answers 404 from its expiry.
EXPIRED = "expired"
# S3 signs whole seconds, at least one: an item with less left gets no URL, it is as good as gone.
MIN_URL_SECONDS = 1


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
            variants = items_sql.variants_of(session, self.db.sql, [media_id]).get(media_id, []) if found else []
        if found is None:
            return None
        row, now = found
        if org is not None and row.org_id != org:
            return None
        return judged(row, now, tuple(Variant(v.storage_key, v.size_bytes, v.mime_type) for v in variants))

    def sign(self, item: Item) -> tuple[str, datetime] | None:
        """A fresh presigned GET URL for a looked-up `item` and when it expires (database clock), or None on a
        store without them. It never outlives the item: valid `presign_ttl`, or until the item's expiry if
        that comes first (a held item has no end yet). Raises Gone when less than a second is left."""
        if not self.store.can_presign:
            return None
        url, _seconds, expires_at = self._sign(item)
        return url, expires_at

    def sign_variants(self, item: Item) -> tuple[Variant, ...]:
        """The item's variants, each with a presigned GET URL capped exactly as the item's own (`sign`); without
        URLs on a store that has none. Raises Gone like `sign`."""
        if not item.variants or not self.store.can_presign:
            return item.variants or ()
        seconds = self._seconds(item)
        return tuple(replace(variant, url=self.store.presigned_url(variant.key, seconds)) for variant in item.variants)

    def lookup(self, media_id: str) -> Item:
        """The item while active. Raises Gone (claimed, deleted or expired; it carries the tombstone) or NotFound."""
        found = self.find(media_id)
        if found is None:
            raise NotFound(f"media id {media_id!r} was never registered.")
        if isinstance(found, Tombstone):
            raise Gone(f"media id {media_id!r} is gone ({found.reason}).", found)
        return found

    def presigned_url(self, media_id: str) -> PresignedUrl:
        """A presigned GET URL for an active item, valid `presign_ttl` or until the item expires if sooner.
        Raises BadInput on a store without presigned URLs (filesystem), then Gone or NotFound exactly like
        `lookup` (Gone too for an item with less than a second left)."""
        validate_id(media_id)
        if not self.store.can_presign:
            raise BadInput(f"lookup --url needs an object store (s3://...); {self.store.url} cannot hand out presigned URLs.")
        item = self.lookup(media_id)
        url, seconds, expires_at = self._sign(item)
        variants = tuple(replace(variant, url=self.store.presigned_url(variant.key, seconds)) for variant in item.variants or ())
        log.info("media.presigned", media_id=media_id, expires_in_s=seconds, variants=len(variants))
        return PresignedUrl(id=media_id, url=url, expires_in=seconds, expires_at=expires_at, variants=variants)

    def _seconds(self, item: Item) -> int:
        """How long a URL of `item` (or of one of its variants) may live, in whole seconds (floored), counted from
        the database time the item was read at: `presign_ttl`, or until the expiry if sooner (a held item has no
        end yet). Raises Gone when less than a second is left."""
        now = item.as_of or self._database_now()
        seconds = int(self.presign_ttl.total_seconds())
        if not item.kept_by_hold:
            left = (item.expires_at - now).total_seconds()
            if left < MIN_URL_SECONDS:
                raise Gone(f"media id {item.id!r} is gone (it expires in under a second).", _expired(item))
            seconds = min(seconds, int(left))
        return seconds

    def _sign(self, item: Item) -> tuple[str, int, datetime]:
        """The URL, its validity in whole seconds and its end, all counted from the database time the item was
        read at."""
        now = item.as_of or self._database_now()
        seconds = self._seconds(replace(item, as_of=now))
        return self.store.presigned_url(item.key, seconds), seconds, now + timedelta(seconds=seconds)

    def _database_now(self) -> datetime:
        with self.db.transaction() as session:
            return session.scalar(select(db_now()))


def judged(row, now: datetime, variants: tuple[Variant, ...]) -> Item | Tombstone:
    """What a lookup answers for the item `row` (a `MediaItem`, or a row with its column names) read at the
    database time `now`: the item while active and not past its expiry (or held), its tombstone otherwise.
    The one judgement of every lookup path (this class, and the HTTP lookup's one statement in keyed_lookup)."""
    if row.state != State.ACTIVE.value:
        return Tombstone(id=row.id, state=row.state, reason=row.deletion_reason, deleted_at=row.deleted_at or row.claimed_at)
    item = Item.from_row(row, as_of=now, variants=variants)
    if item.expires_at <= now and not item.kept_by_hold:
        # No sweep has claimed it yet (a backlog, workers down): it is gone from its expiry all the same.
        return _expired(item)
    return item


def _expired(item: Item) -> Tombstone:
    """The 404 of an item past its expiry that no sweep claimed yet: gone since its expiry, for the reason
    a sweep will record."""
    reason = Reason.RETENTION.value if item.ttl_seconds is None else Reason.TTL.value
    return Tombstone(id=item.id, state=EXPIRED, reason=reason, deleted_at=item.expires_at)
