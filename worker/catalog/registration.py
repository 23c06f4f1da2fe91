"""Registration: one item (a file copied in, or a blob already in the store adopted) or a batch of them.

Every field is validated before anything changes. Then, in three steps (worker/reservations.py):
1. the batch's storage keys are reserved in the catalog (committed), and its IDs and keys checked free in
   the same transaction, after the reservation;
2. files are copied in under the reserved keys (never over an existing blob), keys to adopt are looked
   at in the store (a blob must be there, after the reservation: reconcile may have just deleted it);
3. the rows are inserted in one transaction that consumes the reservations: all of them still held by
   this batch, or nothing is inserted.
On any failure the batch gives its keys back, removing only the blobs it wrote under keys it still holds.
"""

from __future__ import annotations

import mimetypes
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from worker import items as items_sql
from worker import reservations, validation
from worker.binding import StoreBinding
from worker.catalog.results import Item, Variant
from worker.catalog.rules import rules_of
from worker.db import Database, db_now
from config.errors import BadInput, Gone, NotFound, RetentionError
from worker.models import AuditEvent, Organization, State
from worker.policy import lifetime, parse_ttl
from worker.store import BlobDigest, BlobInfo, BlobStore, check_source, open_source, source_digest
from worker.store.keys import key_for_id, validate_id, validate_new_id, validate_new_key

log = structlog.get_logger("worker.catalog")


def parse_created_at(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
        # A timestamp without an offset is taken as UTC, the way the catalog stores every time.
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"malformed --created-at {text!r}: use ISO-8601 between 1970 and now, e.g. 2026-01-31T12:00:00Z.") from None


@dataclass
class _NewItem:
    """One validated registration, before any blob is written."""

    id: str
    org: str
    key: str
    source: Path | None
    ttl: timedelta | None
    created_at: datetime | None
    mime: str | None
    sha256: str | None
    size: int | None = None
    version: str | None = None  # the blob's version on a versioned bucket, from the PUT or a HEAD
    # Derived blobs already in the store (thumbnails, previews) adopted with the item, each by key.
    variants: list["_NewVariant"] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """The item's key and its variants': every key this registration reserves."""
        return [self.key, *(variant.key for variant in self.variants)]


@dataclass
class _NewVariant:
    """A derived blob adopted by key; its size is read from the store under the reservation."""

    key: str
    mime: str
    size: int | None = None
    version: str | None = None  # its version on a versioned bucket, from a HEAD under the reservation


def new_variants(keys: Sequence[str] | None, item_key: str) -> list[_NewVariant]:
    """Variant keys checked like any new key (the store's reserved names refused), none twice, none the item's."""
    variants: list[_NewVariant] = []
    seen = {item_key}
    for key in keys or ():
        key = validate_new_key(key)
        if key in seen:
            raise BadInput(f"storage key {key!r} is given twice for one item (its key and a variant's are all distinct).")
        seen.add(key)
        variants.append(_NewVariant(key, mimetypes.guess_type(key)[0] or "application/octet-stream"))
    return variants


# The store's readers of local files, under the names manifest import and adopt use.
_open_regular = open_source
_source_digest = source_digest


class Registration:
    def __init__(self, db: Database, store: BlobStore, binding: StoreBinding | None = None):
        self.db = db
        self.store = store
        # Blobs go only into the store bound to this catalog: an unmounted volume (its mount point an empty
        # directory) or another catalog's store refuses the registration before a byte is written.
        self.binding = binding or StoreBinding(db, store)

    def database_now(self) -> datetime:
        with self.db.transaction() as session:
            return session.scalar(select(db_now()))

    def validate_new(self, *, org: str, file: str | Path | None, key: str | None, media_id: str | None,
                      ttl: str | None, created_at: str | datetime | None, mime: str | None, sha256: str | None = None,
                      now: datetime, variants: Sequence[str] | None = None) -> _NewItem:
        """Every field of a registration checked, `created_at` against the database clock `now`."""
        validate_id(org, "organization id")
        if (file is None) == (key is None):
            raise BadInput("give exactly one of a file to copy in or a key already in the store.")
        media_id = validate_new_id(media_id) if media_id is not None else secrets.token_urlsafe(18)
        ttl_value = parse_ttl(ttl) if ttl is not None else None
        created = parse_created_at(created_at) if isinstance(created_at, str) else created_at
        if created is not None:
            if created.tzinfo is None:
                raise BadInput("created_at must carry a timezone.")
            validation.created_at(created, now)
        if mime is not None:
            validation.mime_type(mime)
        if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
            raise BadInput(f"invalid sha256 {sha256!r}: give 64 lowercase hex digits.")
        source = None
        if file is not None:
            source = Path(file)
            if not source.exists():
                raise BadInput(f"file {str(source)!r} does not exist.")
            # Readable, and a regular file of a real filesystem: never a FIFO, device, socket or /proc file.
            check_source(source)
            storage_key = key_for_id(media_id)
            mime = mime or mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        else:
            storage_key = validate_new_key(key)
            mime = mime or mimetypes.guess_type(storage_key)[0] or "application/octet-stream"
        return _NewItem(media_id, org, storage_key, source, ttl_value, created, mime, sha256,
                        variants=new_variants(variants, storage_key))

    def _check_free(self, session, new_items: Sequence[_NewItem]) -> None:
        """IDs are never reused, not even after deletion: a tombstone keeps answering 404."""
        taken = items_sql.first_taken(session, self.db.sql, "id", [item.id for item in new_items])
        if taken:
            raise BadInput(f"media id {taken!r} already exists; IDs are never reused.")
        # Item and variant keys alike, against both tables: keys are unique across items and variants.
        used = items_sql.first_taken(session, self.db.sql, "storage_key", [key for item in new_items for key in item.keys])
        if used:
            raise BadInput(f"storage key {used!r} already belongs to another media item.")

    def _org_policies(self, session, orgs: set[str], *, lock: bool) -> dict[str, tuple[int, bool, dict[str, int]]]:
        """Retention seconds, hold state and retention rules of each org; under a share lock when `lock`, so
        none of them changes (retention or rule rewrite, org hold: each takes the org's row lock) between this
        read and the insert that relies on it. The rules are read after the lock, so they are those committed
        before it was granted (read only with `lock`: the reservation step needs no expiry)."""
        statement = select(Organization.id, Organization.retention_seconds, Organization.held_at).where(Organization.id.in_(sorted(orgs)))
        if lock:
            statement = self.db.sql.share_locked(statement)
        found = {row.id: (row.retention_seconds, row.held_at is not None) for row in session.execute(statement)}
        missing = sorted(orgs - found.keys())
        if missing:
            raise BadInput(f"organization {missing[0]!r} does not exist; create it with `media-retention org set {missing[0]}`.")
        rules = rules_of(session, found) if lock else {}
        return {org: (retention, held, rules.get(org, {})) for org, (retention, held) in found.items()}

    def _reserve(self, token: str, new_items: Sequence[_NewItem], purpose: str, *, checked: bool) -> None:
        """Step 1, one transaction: the orgs exist, every key is reserved under `token` (taking over any other
        holder: a re-run after a crash, or a racing registration of the same key), then the IDs and keys are
        checked free, after the reservation, so a registration of the same key that was consuming its own
        reservation meanwhile (we waited for it) is seen and named. `checked`: the caller has just found them
        free (a manifest's check pass); a registration that raced in since still fails the batch on the
        catalog's unique keys, and this batch then deletes only blobs it wrote under keys it holds."""
        with self.db.transaction() as session:
            # A reservation lost in a database crash costs nothing: the batch cannot consume it and, holding
            # nothing, deletes nothing. So this commit need not wait for the WAL flush.
            self.db.sql.relax_commit(session)
            self._org_policies(session, {item.org for item in new_items}, lock=False)
            reservations.reserve(session, self.db.sql, token, purpose,
                                 {key: item.id for item in new_items for key in item.keys}, take_over="any")
            if not checked:
                self._check_free(session, new_items)

    def _store_blobs(self, new_items: Sequence[_NewItem], written: list[str]) -> None:
        """Step 2, under the reservations: copy in files (one `put_files` batch; `written` gets each key this
        call gave a blob) and size the blobs of keys to adopt, read after the reservation.

        A file whose key already holds a blob with exactly its bytes (size and sha256) adopts that blob: what a
        killed run of the same command wrote before its row was committed, or what a registration of the same
        key racing this one wrote (whichever inserts its row first owns it; the other, having lost the key,
        deletes nothing)."""
        files = [item for item in new_items if item.source is not None]
        stored = self.store.put_files([(item.key, item.source) for item in files], written) if files else []
        for item, blob in zip(files, stored, strict=True):
            if item.sha256 is not None and item.sha256 != blob.sha256:
                raise BadInput(f"the sha256 given for {str(item.source)!r} does not match the file.")
            if not blob.written:
                if self.store.digest(item.key) != BlobDigest(blob.size, blob.sha256):
                    raise BadInput(f"storage key {item.key!r} already holds a different blob; refusing to overwrite it.")
                log.info("register.blob_adopted", media_id=item.id, key=item.key, size=blob.size)
                adopted = self.store.stat(item.key)  # the adopted blob's version: one HEAD, only here
                blob_version = adopted.version if adopted is not None else None
            else:
                blob_version = blob.version
            item.sha256, item.size, item.version = blob.sha256, blob.size, blob_version
        # Looked at again after the reservation (a manifest's check pass looked before it: reconcile may have
        # deleted the blob since).
        self._look_at([item for item in new_items if item.source is None], "storage key")
        self._look_at_variants([variant for item in new_items for variant in item.variants])

    def _look_at_variants(self, variants: Sequence) -> None:
        self._look_at(variants, "variant key")

    def _look_at(self, blobs: Sequence, what: str) -> None:
        """Size and version of each blob (items by key, variants), looked at under its reservation; a missing one
        is bad input naming `what` and the key."""
        if not blobs:
            return
        for blob, info in zip(blobs, self.store.stat_many([blob.key for blob in blobs]), strict=True):
            if isinstance(info, RetentionError):
                raise info
            if info is None:
                raise BadInput(f"no blob at {what} {blob.key!r} in {self.store.url}.")
            blob.size, blob.version = info.size, info.version

    def _insert(self, new_items: Sequence[_NewItem], audit: dict | None, token: str) -> list[dict]:
        """Step 3, one transaction: consume this batch's reservations (all still held, or nothing is inserted)
        and insert the rows; with `audit` (action, actor, details), one audit event per org in the same
        transaction, counting that org's rows: the trail of an import is exactly what committed. Returns the
        rows inserted (column -> value)."""
        with self.db.transaction() as session:
            now = session.scalar(select(db_now()))
            policies = self._org_policies(session, {item.org for item in new_items}, lock=True)
            held = reservations.consume(session, self.db.sql, token, [key for item in new_items for key in item.keys])
            lost = sorted({key for item in new_items for key in item.keys} - held)
            if lost:
                raise reservations.ReservationLost(
                    f"storage key {lost[0]!r} was taken over by another registration of the same key while this one "
                    f"was in flight; nothing in this batch was registered.")
            # Keys are unique across items and variants, but each table's unique index sees only itself: checked
            # here, holding every key's reservation, so no registration of one of them can commit meanwhile.
            used = items_sql.first_taken(session, self.db.sql, "storage_key", [key for item in new_items for key in item.keys])
            if used:
                raise BadInput(f"storage key {used!r} already belongs to another media item or variant; "
                               f"nothing in this batch was registered.")
            rows = self._rows(new_items, policies, now)
            items_sql.insert_rows(session, self.db.sql, rows)
            items_sql.insert_variants(session, self.db.sql, self._variant_rows(new_items))
            if audit is not None:
                self._audit(session, rows, audit, {item.id: len(item.variants) for item in new_items if item.variants})
        self._warn_locked_past_expiry(rows, now)
        return rows

    def _warn_locked_past_expiry(self, rows: list[dict], now: datetime) -> None:
        """A bucket whose Object Lock default retention locks each new blob for longer than an item lives keeps
        the bytes past the item's expiry (the item answers 404; its deletion waits for the lock): say so, as a
        warning, not an error (the operator may want exactly that)."""
        retention = self.store.default_retention()
        if retention is None:
            return
        locked_until = now + retention
        early = [row for row in rows if row["expires_at"] < locked_until]
        if early:
            log.warning("register.expires_before_default_retention", store=self.store.url, items=len(early),
                        example=early[0]["id"], expires_at=early[0]["expires_at"].isoformat(),
                        default_retention_days=retention.days,
                        meaning="these items answer 404 at their expiry, but their bytes stay until the bucket's lock ends")

    @staticmethod
    def _rows(new_items: Sequence[_NewItem], policies: dict[str, tuple[int, bool, dict[str, int]]], now: datetime) -> list[dict]:
        rows = []
        for item in new_items:
            created = item.created_at or now
            retention_seconds, org_held, rules = policies[item.org]
            item_lifetime = lifetime(item.ttl, timedelta(seconds=retention_seconds), rules, item.mime)
            rows.append(
                {
                    "id": item.id,
                    "org_id": item.org,
                    "storage_key": item.key,
                    "size_bytes": item.size,
                    "mime_type": item.mime,
                    "sha256": item.sha256,
                    "created_at": created,
                    "ttl_seconds": int(item.ttl.total_seconds()) if item.ttl else None,
                    "expires_at": created + item_lifetime,
                    "state": State.ACTIVE.value,
                    "org_held": org_held,
                    "blob_version": item.version,
                }
            )
        return rows

    @staticmethod
    def _variant_rows(new_items: Sequence[_NewItem]) -> list[dict]:
        return [{"storage_key": variant.key, "item_id": item.id, "size_bytes": variant.size, "mime_type": variant.mime,
                 "sha256": None, "blob_version": variant.version} for item in new_items for variant in item.variants]

    @staticmethod
    def _audit(session, rows: list[dict], audit: dict, variants: dict[str, int] | None = None) -> None:
        by_org: dict[str, list[dict]] = {}
        for row in rows:
            by_org.setdefault(row["org_id"], []).append(row)
        variants = variants or {}

        def details(org_rows: list[dict]) -> dict:
            found = {**audit.get("details", {}), "count": len(org_rows), "bytes": sum(row["size_bytes"] for row in org_rows)}
            derived = sum(variants.get(row["id"], 0) for row in org_rows)
            return {**found, "variants": derived} if derived else found

        session.execute(insert(AuditEvent.__table__), [
            {"action": audit["action"], "actor": audit["actor"], "org_id": org_id, "details": details(org_rows)}
            for org_id, org_rows in sorted(by_org.items())
        ])

    def register_batch(self, new_items: Sequence[_NewItem], audit: dict | None = None) -> list[Item]:
        """`write_batch`, answered as items (with their variants when they have any)."""
        rows = self.write_batch(new_items, audit)
        variants = {item.id: tuple(Variant(v.key, v.size, v.mime) for v in item.variants) for item in new_items if item.variants}
        return [Item(id=row["id"], org=row["org_id"], key=row["storage_key"], size=row["size_bytes"], mime=row["mime_type"],
                     sha256=row["sha256"], created_at=row["created_at"], ttl_seconds=row["ttl_seconds"],
                     expires_at=row["expires_at"], state=row["state"], variants=variants.get(row["id"]))
                for row in rows]

    def write_batch(self, new_items: Sequence[_NewItem], audit: dict | None = None, *, purpose: str = "register",
                    checked: bool = False) -> list[dict]:
        """Reserve the keys, store the blobs, insert the rows (the module's three steps); all or nothing.
        Returns the rows inserted (column -> value): an import of millions sums their sizes and needs no `Item`
        for each. On any failure the batch gives its keys back and removes the blobs it wrote under keys it
        still holds; a raced ID or key fails the batch on the catalog's unique keys or its reservations."""
        # A registration may bind an unmarked store although the catalog is empty (adopting): importing an
        # existing volume (`register --manifest` of its keys) is how a catalog starts out. Never one whose
        # catalog has live items but no blob of theirs in the store (an unmounted volume).
        self.binding.ensure(adopting=True)
        token = secrets.token_hex(16)
        written: list[str] = []
        try:
            self._reserve(token, new_items, purpose, checked=checked)
            self._store_blobs(new_items, written)
            return self._insert(new_items, audit, token)
        except BaseException as exc:
            try:
                reservations.release(self.db, self.store, token, [key for item in new_items for key in item.keys], written)
            except Exception as cleanup:  # noqa: BLE001 - the batch's own error is the one to report
                log.error("register.release_failed", error=f"{type(cleanup).__name__}: {cleanup}", keys=len(new_items))
            if isinstance(exc, IntegrityError):
                raise BadInput("a media id or storage key in this batch was registered concurrently; "
                               "nothing in this batch was imported.") from None
            raise

    def adopt_batch(self, new_items: Sequence[_NewItem], audit: dict) -> list[dict]:
        """Register blobs already in the store (`adopt`), skipping instead of failing: a key another
        registration has reserved (in flight), a key the catalog knows (checked after the reservation), a blob
        gone since it was listed (reconcile may have deleted it). Nothing is taken over and nothing is written
        or deleted in the store. Returns the rows inserted."""
        token = secrets.token_hex(16)
        wanted = {item.key: item for item in new_items}
        try:
            with self.db.transaction() as session:
                held = reservations.reserve(session, self.db.sql, token, "adopt", {key: item.id for key, item in wanted.items()},
                                            take_over="none")
                known = items_sql.known_keys(session, sorted(held)) if held else set()
            fresh = [wanted[key] for key in sorted(held - known)]
            present: list[_NewItem] = []
            for item, info in zip(fresh, self.store.stat_many([item.key for item in fresh]), strict=True):
                if isinstance(info, BlobInfo):
                    item.size, item.version = info.size, info.version
                    present.append(item)
            with self.db.transaction() as session:
                now = session.scalar(select(db_now()))
                policies = self._org_policies(session, {item.org for item in present}, lock=True) if present else {}
                consumed = reservations.consume(session, self.db.sql, token, [item.key for item in present])
                rows = self._rows([item for item in present if item.key in consumed], policies, now)
                items_sql.insert_rows(session, self.db.sql, rows)
                reservations.drop(session, token)
                if rows:
                    self._audit(session, rows, audit)
        except BaseException:
            try:
                reservations.release(self.db, self.store, token, list(wanted), [])
            except Exception as cleanup:  # noqa: BLE001
                log.error("adopt.release_failed", error=f"{type(cleanup).__name__}: {cleanup}")
            raise
        return rows

    def register(self, *, org: str, file: str | Path | None = None, key: str | None = None, media_id: str | None = None,
                 ttl: str | None = None, created_at: str | datetime | None = None, mime: str | None = None,
                 sha256: str | None = None, variants: Sequence[str] | None = None) -> Item:
        """Register one item: `file` is copied in under a new key, `key` adopts a blob already stored; each of
        `variants` adopts a derived blob already stored, owned by the item from then on."""
        new = self.validate_new(org=org, file=file, key=key, media_id=media_id, ttl=ttl, created_at=created_at, mime=mime,
                                 sha256=sha256, now=self.database_now(), variants=variants)
        item = self.register_batch([new])[0]
        log.info("media.registered", media_id=item.id, org=org, key=item.key, size=item.size, expires_at=item.expires_at.isoformat())
        return item

    def add_variants(self, media_id: str, keys: Sequence[str], *, actor: str = "cli") -> list[Variant]:
        """Adopt blobs already in the store as variants of the item `media_id`, under the same three steps as a
        registration: the keys reserved (and checked free of any item or variant after that), the blobs looked
        at, then the rows inserted in the transaction that consumes the reservations, with the item's row locked
        and still active. A held item takes variants (they are kept with it); an item gone by lookup's rule
        (claimed, deleted, or expired and unheld) is refused: its deletion may already be under way."""
        validate_id(media_id)
        if not keys:
            raise BadInput("give at least one --key to add as a variant.")
        variants = new_variants(keys, "")
        self.binding.ensure()
        token = secrets.token_hex(16)
        try:
            with self.db.transaction() as session:
                reservations.reserve(session, self.db.sql, token, "register", {v.key: media_id for v in variants},
                                     take_over="any")
                self._check_item_takes_variants(session, media_id)
                used = items_sql.first_taken(session, self.db.sql, "storage_key", [v.key for v in variants])
                if used:
                    raise BadInput(f"storage key {used!r} already belongs to a media item or a variant.")
            self._look_at_variants(variants)
            with self.db.transaction() as session:
                row = self._check_item_takes_variants(session, media_id)
                held = reservations.consume(session, self.db.sql, token, [v.key for v in variants])
                lost = sorted({v.key for v in variants} - held)
                if lost:
                    raise reservations.ReservationLost(
                        f"storage key {lost[0]!r} was taken over by another registration of the same key while this one "
                        f"was in flight; no variant was added.")
                items_sql.insert_variants(session, self.db.sql, [
                    {"storage_key": v.key, "item_id": media_id, "size_bytes": v.size, "mime_type": v.mime, "sha256": None,
                     "blob_version": v.version} for v in variants])
                session.add(AuditEvent(action="variant_add", actor=actor, org_id=row.org_id, media_id=media_id,
                                       details={"count": len(variants), "bytes": sum(v.size for v in variants),
                                                "keys": [v.key for v in variants][:50]}))
        except BaseException as exc:
            try:
                reservations.release(self.db, self.store, token, [v.key for v in variants], [])
            except Exception as cleanup:  # noqa: BLE001 - the command's own error is the one to report
                log.error("variant.release_failed", error=f"{type(cleanup).__name__}: {cleanup}")
            if isinstance(exc, IntegrityError):
                raise BadInput("a variant key was registered concurrently; no variant was added.") from None
            raise
        log.info("media.variants_added", media_id=media_id, count=len(variants), keys=[v.key for v in variants][:20])
        return [Variant(v.key, v.size, v.mime) for v in variants]

    @staticmethod
    def _check_item_takes_variants(session, media_id: str):
        """The item's row, locked: it must exist and not be gone (claimed, deleted, or expired and unheld by the
        database clock), or the variant could outlive a deletion already decided."""
        found = items_sql.locked_item(session, media_id)
        if found is None:
            raise NotFound(f"media id {media_id!r} was never registered.")
        row, now = found
        kept = row.held_at is not None or bool(row.org_held)
        if row.state != State.ACTIVE.value or (row.expires_at <= now and not kept):
            raise Gone(f"media id {media_id!r} is gone; variants can only be added to an active item.", None)
        return row
