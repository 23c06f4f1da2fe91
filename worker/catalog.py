"""The catalog API: what an upstream media service imports to register, look up, hold and purge media.

    catalog = Catalog.from_settings(get_settings())
    item = catalog.register(org="acme", file=Path("photo.jpg"), ttl="1h")
    catalog.lookup(item["id"])          # the item while active; raises Gone once claimed/deleted

Every method validates all of its input before it changes anything, so bad input changes nothing.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import mimetypes
import os
import re
import secrets
import stat as stat_module
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

import structlog
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from config.settings import Settings
from worker.db import Database, db_now, plus_seconds
from worker.errors import BadInput, BlobExists, Gone, NotFound, RetentionError
from worker.models import AuditEvent, MediaItem, Organization, State
from worker.policy import describe, effective_lifetime, parse_retention, parse_ttl
from worker.store import BlobDigest, BlobStore, open_store
from worker import validation
from worker.store.keys import key_for_id, validate_id, validate_new_key
from worker.sweep import Sweeper

log = structlog.get_logger("worker.catalog")

# Manifest rows written per transaction: large enough to import millions of rows in minutes,
# small enough that a failed batch is cheap to redo.
MANIFEST_BATCH = 500
# A manifest line is a few hundred bytes; the bound keeps a file without newlines (a binary, a huge
# single line) from being read into memory whole.
MANIFEST_LINE_MAX = 64 * 1024
# Bad lines kept by number for the report; the count covers all of them.
MANIFEST_ERRORS_KEPT = 1000
# Store lookups in flight while checking a manifest: an S3 HEAD is a round trip, a local stat is not.
MANIFEST_STORE_CHECKS = 8
_MANIFEST_FIELDS = {"org", "id", "file", "key", "ttl", "created_at", "mime", "sha256"}


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


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


@dataclass
class ManifestLineError:
    line: int
    message: str


class ManifestError(BadInput):
    def __init__(self, errors: list[ManifestLineError], total_lines: int, bad_lines: int | None = None):
        self.errors = errors
        self.bad_lines = bad_lines if bad_lines is not None else len(errors)
        first = errors[0]
        more = f" (and {self.bad_lines - 1} more bad lines)" if self.bad_lines > 1 else ""
        super().__init__(f"manifest line {first.line}: {first.message}{more}; nothing was imported.")


@dataclass
class _ManifestCheck:
    """What checking a manifest has found so far."""

    now: datetime  # the database's clock when the check began: created_at must not lie beyond it
    lines: int = 0
    bad_lines: int = 0
    ids: dict[str, int] = field(default_factory=dict)  # explicit media ID -> its line
    keys: dict[str, int] = field(default_factory=dict)  # storage key -> its line
    orgs: dict[str, int] = field(default_factory=dict)  # org -> the first line naming it
    errors: dict[int, str] = field(default_factory=dict)  # line -> its first error (the lowest lines kept)

    def error(self, line: int, message: str) -> None:
        if line in self.errors:
            return
        self.bad_lines += 1
        self.errors[line] = message
        if len(self.errors) > 2 * MANIFEST_ERRORS_KEPT:
            # Lines are checked in order, chunks a batch late: keeping the lowest numbers is exact.
            self.errors = dict(sorted(self.errors.items())[:MANIFEST_ERRORS_KEPT])

    def sorted_errors(self) -> list[ManifestLineError]:
        return [ManifestLineError(line, message) for line, message in sorted(self.errors.items())[:MANIFEST_ERRORS_KEPT]]


def _open_regular(path: Path, what: str) -> BinaryIO:
    """Open a file for reading only if it is a regular file. O_NONBLOCK: opening a FIFO without a
    writer (or a device) must not hang; the check on the open descriptor cannot be raced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadInput(f"cannot read {what} {str(path)!r}: {exc.strerror}.") from None
    mode = os.fstat(fd).st_mode
    if not stat_module.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat_module.S_ISDIR(mode) else "a FIFO" if stat_module.S_ISFIFO(mode) else \
            "a device" if stat_module.S_ISCHR(mode) or stat_module.S_ISBLK(mode) else "not a file"
        raise BadInput(f"{what} {str(path)!r} is not a regular file ({kind}).")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _source_digest(path: Path) -> BlobDigest:
    with _open_regular(path, "file") as handle:
        size = os.fstat(handle.fileno()).st_size
        return BlobDigest(size=size, sha256=hashlib.file_digest(handle, "sha256").hexdigest())


def _describes(item: _NewItem, row) -> bool:
    """Whether a manifest line describes the registered row exactly (a re-run of the same import)."""
    if (row.org_id, row.storage_key, row.mime_type) != (item.org, item.key, item.mime):
        return False
    if row.ttl_seconds != (int(item.ttl.total_seconds()) if item.ttl else None):
        return False
    if item.created_at is not None and row.created_at != item.created_at:
        return False
    if item.source is not None:
        return row.sha256 == _source_digest(item.source).sha256
    return item.sha256 is None or item.sha256 == row.sha256


class Catalog:
    def __init__(self, db: Database, store: BlobStore, settings: Settings):
        self.db = db
        self.store = store
        self.settings = settings
        self.sweeper = Sweeper(db, store, claim_lease=settings.claim_lease, batch_size=settings.sweep_batch_size)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Catalog":
        return cls(Database(settings.database_url), open_store(settings.storage_url, **store_options(settings)), settings)

    def close(self) -> None:
        self.store.close()
        self.db.dispose()

    # -- organizations -------------------------------------------------------------------------

    def set_org(self, org_id: str, retention: str | None = None, *, actor: str | None = None) -> dict:
        """Create the org or change its retention; the change applies to stored items from the next sweep.

        Without `retention` an existing org is left exactly as it is: the default retention only
        applies to an org being created, and an operation that changes nothing reschedules nothing."""
        validate_id(org_id, "organization id")
        new = parse_retention(retention) if retention is not None else None
        actor = validation.actor(actor or default_actor())
        items = MediaItem.__table__
        with self.db.transaction() as session:
            # Row lock: registrations read the retention under a share lock, so none slips between
            # this update and the rewrite of expiry times below.
            org = session.get(Organization, org_id, with_for_update=True)
            created = org is None
            old = None if created else org.retention_seconds
            if created:
                seconds = int((new or self.settings.default_retention).total_seconds())
                org = Organization(id=org_id, retention_seconds=seconds)
                session.add(org)
                session.flush()
            else:
                seconds = int(new.total_seconds()) if new is not None else old
            rewritten = 0
            if not created and seconds != old:
                org.retention_seconds = seconds
                # The database's clock: `verify` compares it with claim times, which are the database's too.
                org.updated_at = db_now()
                rewritten = session.execute(
                    update(items)
                    .where(items.c.org_id == org_id, items.c.state == State.ACTIVE.value, items.c.ttl_seconds.is_(None))
                    .values(expires_at=plus_seconds(items.c.created_at, seconds))
                ).rowcount
            if created or seconds != old:
                session.add(
                    AuditEvent(
                        action="org_create" if created else "org_set",
                        actor=actor,
                        org_id=org_id,
                        details={"retention": describe(timedelta(seconds=seconds)),
                                 "previous": None if old is None else describe(timedelta(seconds=old)),
                                 "items_rescheduled": rewritten},
                    )
                )
        log.info("org.set", org=org_id, retention_s=seconds, created=created, changed=created or seconds != old,
                 items_rescheduled=rewritten)
        return self.show_org(org_id)

    def show_org(self, org_id: str) -> dict:
        validate_id(org_id, "organization id")
        items = MediaItem.__table__
        with self.db.transaction() as session:
            org = session.get(Organization, org_id)
            if org is None:
                raise NotFound(f"organization {org_id!r} does not exist; create it with `media-retention org set {org_id}`.")
            by_state = dict(
                session.execute(
                    select(items.c.state, func.count()).where(items.c.org_id == org_id).group_by(items.c.state)
                ).all()
            )
            active_bytes = session.scalar(
                select(func.coalesce(func.sum(items.c.size_bytes), 0)).where(
                    items.c.org_id == org_id, items.c.state == State.ACTIVE.value
                )
            )
        return {
            "org": org.id,
            "retention": describe(timedelta(seconds=org.retention_seconds)),
            "retention_seconds": org.retention_seconds,
            "held": org.held_at is not None,
            "hold_reason": org.hold_reason,
            "items": {state.value: int(by_state.get(state.value, 0)) for state in State},
            "active_bytes": int(active_bytes or 0),
        }

    # -- registration --------------------------------------------------------------------------

    def _db_now(self) -> datetime:
        with self.db.transaction() as session:
            return session.scalar(select(db_now()))

    def _validate_new(self, *, org: str, file: str | Path | None, key: str | None, media_id: str | None,
                      ttl: str | None, created_at: str | datetime | None, mime: str | None, sha256: str | None = None,
                      now: datetime) -> _NewItem:
        """Every field of a registration checked, `created_at` against the database clock `now`."""
        validate_id(org, "organization id")
        if (file is None) == (key is None):
            raise BadInput("give exactly one of a file to copy in or a key already in the store.")
        media_id = validate_id(media_id) if media_id is not None else secrets.token_urlsafe(18)
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
            if not source.is_file():
                raise BadInput(f"file {str(source)!r} does not exist or is not a regular file.")
            if not os.access(source, os.R_OK):
                raise BadInput(f"file {str(source)!r} is not readable.")
            storage_key = key_for_id(media_id)
            mime = mime or mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        else:
            storage_key = validate_new_key(key)
            mime = mime or mimetypes.guess_type(storage_key)[0] or "application/octet-stream"
        return _NewItem(media_id, org, storage_key, source, ttl_value, created, mime, sha256)

    def _check_free(self, session, new_items: Sequence[_NewItem]) -> None:
        """IDs are never reused, not even after deletion: a tombstone keeps answering 404."""
        ids = [item.id for item in new_items]
        taken = session.scalars(select(MediaItem.id).where(MediaItem.id.in_(ids))).first()
        if taken:
            raise BadInput(f"media id {taken!r} already exists; IDs are never reused.")
        keys = [item.key for item in new_items]
        used = session.scalars(select(MediaItem.storage_key).where(MediaItem.storage_key.in_(keys))).first()
        if used:
            raise BadInput(f"storage key {used!r} already belongs to another media item.")

    def _org_policies(self, session, orgs: set[str], *, lock: bool) -> dict[str, tuple[int, bool]]:
        """Retention seconds and hold state of each org; under a share lock when `lock`, so neither
        changes (retention rewrite, org hold) between this read and the insert that relies on it."""
        statement = select(Organization.id, Organization.retention_seconds, Organization.held_at).where(Organization.id.in_(sorted(orgs)))
        if lock and self.db.dialect == "postgresql":
            statement = statement.with_for_update(read=True)
        found = {row.id: (row.retention_seconds, row.held_at is not None) for row in session.execute(statement)}
        missing = sorted(orgs - found.keys())
        if missing:
            raise BadInput(f"organization {missing[0]!r} does not exist; create it with `media-retention org set {missing[0]}`.")
        return found

    def _store_blobs(self, new_items: Sequence[_NewItem]) -> list[str]:
        """Copy in files / size adopted keys; return the keys this call wrote (to undo on failure).

        A file whose key already holds a blob with exactly its bytes (size and sha256) adopts that
        blob: it is what a killed run of the same command wrote before its row was committed (the
        caller checked that no row claims the key), so re-running the command succeeds."""
        written: list[str] = []
        try:
            for item in new_items:
                if item.source is not None:
                    source = _source_digest(item.source)
                    if item.sha256 is not None and item.sha256 != source.sha256:
                        raise BadInput(f"the sha256 given for {str(item.source)!r} does not match the file.")
                    item.sha256 = source.sha256
                    try:
                        item.size = self.store.put_file(item.key, item.source)
                        written.append(item.key)
                    except BlobExists:
                        if self.store.digest(item.key) != source:
                            raise BadInput(f"storage key {item.key!r} already holds a different blob; refusing to overwrite it.") from None
                        item.size = source.size
                        log.info("register.blob_adopted", media_id=item.id, key=item.key, size=item.size)
                else:
                    info = self.store.stat(item.key)
                    if info is None:
                        raise BadInput(f"no blob at storage key {item.key!r} in {self.store.url}.")
                    item.size = info.size
        except BaseException:
            self._discard(written)
            raise
        return written

    def _discard(self, keys: list[str]) -> None:
        if keys:
            for result in self.store.delete_many(keys):
                if not result.ok:
                    log.error("register.cleanup_failed", key=result.key, error=result.error)

    def _insert(self, new_items: Sequence[_NewItem], audit: dict | None = None) -> list[dict]:
        """Insert the rows in one transaction; with `audit` (action, actor, details), one audit event per
        org in the same transaction, counting that org's rows: the trail of an import is exactly what committed."""
        with self.db.transaction() as session:
            now = session.scalar(select(db_now()))
            policies = self._org_policies(session, {item.org for item in new_items}, lock=True)
            self._check_free(session, new_items)
            rows = []
            for item in new_items:
                created = item.created_at or now
                retention_seconds, org_held = policies[item.org]
                lifetime = effective_lifetime(item.ttl, timedelta(seconds=retention_seconds))
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
                        "expires_at": created + lifetime,
                        "state": State.ACTIVE.value,
                        "org_held": org_held,
                    }
                )
            session.execute(insert(MediaItem), rows)
            if audit is not None:
                by_org: dict[str, list[dict]] = {}
                for row in rows:
                    by_org.setdefault(row["org_id"], []).append(row)
                session.execute(insert(AuditEvent.__table__), [
                    {"action": audit["action"], "actor": audit["actor"], "org_id": org_id,
                     "details": {**audit.get("details", {}), "count": len(org_rows),
                                 "bytes": sum(row["size_bytes"] for row in org_rows)}}
                    for org_id, org_rows in sorted(by_org.items())
                ])
        return [self._public(row) for row in rows]

    @staticmethod
    def _public(row: dict) -> dict:
        return {
            "id": row["id"],
            "org": row["org_id"],
            "key": row["storage_key"],
            "size": row["size_bytes"],
            "mime": row["mime_type"],
            "sha256": row["sha256"],
            "created_at": row["created_at"].isoformat(),
            "ttl_seconds": row["ttl_seconds"],
            "expires_at": row["expires_at"].isoformat(),
            "state": row["state"],
        }

    def _register_batch(self, new_items: Sequence[_NewItem], audit: dict | None = None) -> list[dict]:
        """Store blobs, then insert rows in one transaction; on any failure remove the blobs written."""
        with self.db.transaction() as session:
            self._org_policies(session, {item.org for item in new_items}, lock=False)
            self._check_free(session, new_items)
        written = self._store_blobs(new_items)
        try:
            return self._insert(new_items, audit)
        except IntegrityError:
            self._discard(written)
            raise BadInput("a media id or storage key in this request was registered concurrently; nothing was imported.") from None
        except BaseException:
            self._discard(written)
            raise

    def register(self, *, org: str, file: str | Path | None = None, key: str | None = None, media_id: str | None = None,
                 ttl: str | None = None, created_at: str | datetime | None = None, mime: str | None = None,
                 sha256: str | None = None) -> dict:
        """Register one item: `file` is copied in under a new key, `key` adopts a blob already stored."""
        new = self._validate_new(org=org, file=file, key=key, media_id=media_id, ttl=ttl, created_at=created_at, mime=mime,
                                 sha256=sha256, now=self._db_now())
        item = self._register_batch([new])[0]
        log.info("media.registered", media_id=item["id"], org=org, key=item["key"], size=item["size"], expires_at=item["expires_at"])
        return item

    def _manifest_lines(self, handle: BinaryIO) -> Iterator[tuple[int, dict | ManifestLineError]]:
        """(line number, row or the line's error) for each non-blank line, reading at most
        MANIFEST_LINE_MAX bytes at a time, so memory stays flat whatever the file holds."""
        number = 0
        while raw := handle.readline(MANIFEST_LINE_MAX + 1):
            number += 1
            if len(raw) > MANIFEST_LINE_MAX and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(MANIFEST_LINE_MAX + 1)
                yield number, ManifestLineError(number, f"longer than {MANIFEST_LINE_MAX // 1024} KiB")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, ManifestLineError(number, "not valid UTF-8")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except RecursionError:
                yield number, ManifestLineError(number, "not valid JSON (nested too deeply)")
                continue
            except ValueError as exc:
                yield number, ManifestLineError(number, f"not valid JSON ({getattr(exc, 'msg', str(exc))})")
                continue
            if not isinstance(row, dict):
                yield number, ManifestLineError(number, "each line must be a JSON object")
                continue
            unknown = sorted(set(row) - _MANIFEST_FIELDS)
            if unknown:
                yield number, ManifestLineError(number, f"unknown field {unknown[0]!r}")
                continue
            yield number, row

    def _validate_manifest_row(self, row: dict, base: Path, now: datetime) -> _NewItem:
        if not isinstance(row.get("org"), str):
            raise BadInput("field 'org' is required and must be a string")
        for name in ("id", "file", "key", "ttl", "created_at", "mime", "sha256"):
            if row.get(name) is not None and not isinstance(row[name], str):
                raise BadInput(f"field {name!r} must be a string")
        file = row.get("file")
        if file is not None and not os.path.isabs(file):
            file = base / file  # relative paths are read from the manifest's directory
        return self._validate_new(org=row["org"], file=file, key=row.get("key"), media_id=row.get("id"), ttl=row.get("ttl"),
                                  created_at=row.get("created_at"), mime=row.get("mime"), sha256=row.get("sha256"), now=now)

    def register_manifest(self, path: str | Path, *, batch_size: int = MANIFEST_BATCH,
                          progress: Callable[[int], None] | None = None) -> dict:
        """Import a JSON-lines manifest.

        First every line is checked, against the database *and* the store, and any bad line (each
        reported by number) imports nothing. Then rows go in batches, each all-or-nothing. A line
        whose ID is already registered exactly as the line describes is skipped, and a file whose
        key already holds its very bytes adopts them, so re-running a manifest that a crash cut
        short imports the rest.

        Memory: the check keeps each line's media ID and storage key with its line number, to find
        duplicates within the file (about 300 bytes a line: some 300 MB for a million lines); rows
        themselves are read, checked and written a batch at a time."""
        path = Path(path)
        with _open_regular(path, "manifest") as handle:
            seen = os.fstat(handle.fileno())
            check = _ManifestCheck(now=self._db_now())
            chunk: list[tuple[int, _NewItem, bool]] = []
            with ThreadPoolExecutor(MANIFEST_STORE_CHECKS, thread_name_prefix="manifest-check") as pool:
                for number, row in self._manifest_lines(handle):
                    check.lines += 1
                    item = self._check_manifest_line(check, number, row, path.parent)
                    if item is not None:
                        chunk.append((number, item, row.get("id") is not None))
                    if len(chunk) == batch_size:
                        self._check_manifest_chunk(check, chunk, pool)
                        chunk = []
                if chunk:
                    self._check_manifest_chunk(check, chunk, pool)
            if check.lines == 0:
                raise BadInput(f"manifest {str(path)!r} has no lines; nothing was imported.")
            with self.db.transaction() as session:
                known = set(session.scalars(select(Organization.id).where(Organization.id.in_(sorted(check.orgs)))))
            for org in sorted(check.orgs.keys() - known):
                check.error(check.orgs[org], f"organization {org!r} does not exist")
            if check.errors:
                raise ManifestError(check.sorted_errors(), check.lines, check.bad_lines)
            now = os.fstat(handle.fileno())
            if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns):
                raise BadInput(f"manifest {str(path)!r} changed while it was being checked; nothing was imported.")
            handle.seek(0)
            summary = self._import_manifest(handle, path, batch_size, progress, check.now)
        log.info("manifest.imported", path=str(path), items=summary["imported"], bytes=summary["bytes"],
                 already_registered=summary["already_registered"])
        return summary

    def _check_manifest_line(self, check: "_ManifestCheck", number: int, row: dict | ManifestLineError, base: Path) -> _NewItem | None:
        """What one line alone (and the lines before it) can tell; None when the line is bad."""
        if isinstance(row, ManifestLineError):
            check.error(number, row.message)
            return None
        try:
            item = self._validate_manifest_row(row, base, check.now)
        except RetentionError as exc:
            check.error(number, str(exc).rstrip("."))
            return None
        if row.get("id") is not None:
            if item.id in check.ids:
                check.error(number, f"duplicate id {item.id!r} (first on line {check.ids[item.id]})")
                return None
            check.ids[item.id] = number
        if row.get("id") is not None or item.source is None:  # a file line without an ID gets a fresh random key
            if item.key in check.keys:
                check.error(number, f"duplicate key {item.key!r} (first on line {check.keys[item.key]})")
                return None
            check.keys[item.key] = number
        check.orgs.setdefault(item.org, number)
        return item

    def _check_manifest_chunk(self, check: "_ManifestCheck", chunk: list[tuple[int, _NewItem, bool]], pool: ThreadPoolExecutor) -> None:
        """Check a chunk of lines against the catalog (IDs and keys taken) and the store (a key's blob
        exists; a file's target key is free or already holds its very bytes)."""
        items = MediaItem.__table__
        with self.db.transaction() as session:
            by_id = {row.id: row for row in session.execute(
                select(items).where(items.c.id.in_([item.id for _, item, explicit in chunk if explicit])))}
            key_owner = dict(session.execute(
                select(items.c.storage_key, items.c.id).where(items.c.storage_key.in_([item.key for _, item, _ in chunk]))).all())
        to_store: list[tuple[int, _NewItem]] = []
        for number, item, explicit in chunk:
            existing = by_id.get(item.id) if explicit else None
            if existing is not None:
                if not _describes(item, existing):
                    check.error(number, f"media id {item.id!r} already exists with other content")
                continue  # already registered exactly so: the import skips it
            if key_owner.get(item.key) is not None:
                check.error(number, f"storage key {item.key!r} already belongs to another item")
                continue
            if item.source is None or explicit:
                to_store.append((number, item))
        for (number, item), problem in zip(to_store, pool.map(self._store_problem, [item for _, item in to_store]), strict=True):
            if problem:
                check.error(number, problem)

    def _store_problem(self, item: _NewItem) -> str | None:
        """Why the store cannot take this line, or None."""
        try:
            if item.source is None:
                return None if self.store.stat(item.key) is not None else f"no blob at storage key {item.key!r}"
            if self.store.stat(item.key) is None:
                return None
            if self.store.digest(item.key) != _source_digest(item.source):
                return f"storage key {item.key!r} already holds a different blob"
            return None  # the very bytes, left by a run that was cut short: adopted at import
        except RetentionError as exc:
            return str(exc).rstrip(".")

    def _import_manifest(self, handle: BinaryIO, path: Path, batch_size: int, progress: Callable[[int], None] | None,
                         now: datetime) -> dict:
        summary = {"imported": 0, "already_registered": 0, "bytes": 0, "manifest": str(path)}
        batch: list[_NewItem] = []
        actor = validation.actor(default_actor())

        def flush() -> None:
            explicit = [item.id for item in batch if item.id is not None]
            with self.db.transaction() as session:
                registered = set(session.scalars(select(MediaItem.id).where(MediaItem.id.in_(explicit))))
            fresh = [item for item in batch if item.id not in registered]
            for item in fresh:
                if item.id is None:
                    item.id = secrets.token_urlsafe(18)
                    if item.source is not None:
                        item.key = key_for_id(item.id)
            if fresh:
                audit = {"action": "import", "actor": actor, "details": {"manifest": path.name}}
                summary["bytes"] += sum(row["size"] for row in self._register_batch(fresh, audit))
            summary["imported"] += len(fresh)
            summary["already_registered"] += len(batch) - len(fresh)
            batch.clear()
            if progress:
                progress(summary["imported"])

        for _number, row in self._manifest_lines(handle):
            item = self._validate_manifest_row(row, path.parent, now)
            if row.get("id") is None:
                item.id = None  # drawn at import, after the already-registered check
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        return summary

    # -- lookup --------------------------------------------------------------------------------

    def lookup(self, media_id: str) -> dict:
        """The item while active. Raises Gone (claimed or deleted) or NotFound (never seen)."""
        validate_id(media_id)
        with self.db.transaction() as session:
            item = session.get(MediaItem, media_id)
        if item is None:
            raise NotFound(f"media id {media_id!r} was never registered.")
        if item.state != State.ACTIVE.value:
            body = {
                "id": media_id,
                "status": 404,
                "error": "gone",
                "deleted_at": (item.deleted_at or item.claimed_at).isoformat(),
                "reason": item.deletion_reason,
                "state": item.state,
            }
            raise Gone(f"media id {media_id!r} is gone ({item.deletion_reason}).", body)
        return item.to_dict()

    def presigned_url(self, media_id: str) -> dict:
        """A presigned GET URL for an active item, valid for `presign_ttl`. Raises BadInput on a store
        without presigned URLs (filesystem), then Gone or NotFound exactly like `lookup`."""
        validate_id(media_id)
        if not self.store.can_presign:
            raise BadInput(f"lookup --url needs an object store (s3://...); {self.store.url} cannot hand out presigned URLs.")
        item = self.lookup(media_id)
        seconds = int(self.settings.presign_ttl.total_seconds())
        url = self.store.presigned_url(item["key"], seconds)
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        log.info("media.presigned", media_id=media_id, expires_in_s=seconds)
        return {"id": media_id, "url": url, "expires_in": seconds, "expires_at": expires_at.isoformat()}

    # -- holds ---------------------------------------------------------------------------------

    def _require_items(self, session, ids: Sequence[str]) -> dict[str, MediaItem]:
        for media_id in ids:
            validate_id(media_id)
        found = {item.id: item for item in session.scalars(select(MediaItem).where(MediaItem.id.in_(list(ids))).with_for_update())}
        for media_id in ids:
            if media_id not in found:
                raise NotFound(f"media id {media_id!r} was never registered; nothing was changed.")
        return found

    def set_hold(self, *, held: bool, reason: str, ids: Sequence[str] = (), org: str | None = None, actor: str | None = None) -> dict:
        """Put items or a whole org on hold (or release them). Recorded with who and why."""
        if not isinstance(reason, str) or not reason.strip():
            raise BadInput("a --reason is required: say why media is held or released.")
        validation.reason(reason)
        if bool(ids) == (org is not None):
            raise BadInput("give media IDs or --org, not both and not neither.")
        action = "hold" if held else "release"
        actor = validation.actor(actor or default_actor())
        changed: list[str] = []
        with self.db.transaction() as session:
            stamp = session.scalar(select(db_now())) if held else None
            if org is not None:
                validate_id(org, "organization id")
                target = session.get(Organization, org, with_for_update=True)
                if target is None:
                    raise NotFound(f"organization {org!r} does not exist; nothing was changed.")
                if (target.held_at is not None) != held:
                    changed.append(org)
                target.held_at, target.hold_reason = stamp, (reason if held else None)
                # Mirror the hold on the org's active rows in the same transaction (see MediaItem.org_held).
                items = MediaItem.__table__
                session.execute(
                    update(items).where(items.c.org_id == org, items.c.state == State.ACTIVE.value, items.c.org_held.is_(not held))
                    .values(org_held=held)
                )
                session.add(AuditEvent(action=f"org_{action}", actor=actor, org_id=org, reason=reason))
            else:
                found = self._require_items(session, ids)
                if held:
                    gone = [media_id for media_id in ids if found[media_id].state != State.ACTIVE.value]
                    if gone:
                        raise Gone(f"media id {gone[0]!r} is already being deleted or gone; nothing was changed.",
                                   {"id": gone[0], "status": 404, "error": "gone"})
                for media_id in dict.fromkeys(ids):
                    item = found[media_id]
                    if (item.held_at is not None) != held:
                        changed.append(media_id)
                    item.held_at, item.hold_reason = stamp, (reason if held else None)
                    session.add(AuditEvent(action=action, actor=actor, org_id=item.org_id, media_id=media_id, reason=reason))
        log.info(f"media.{action}", org=org, ids=list(ids)[:20], changed=len(changed), actor=actor, reason=reason)
        return {"action": action, "org": org, "ids": list(dict.fromkeys(ids)), "changed": changed, "reason": reason, "actor": actor}

    # -- purge ---------------------------------------------------------------------------------

    def purge(self, *, ids: Sequence[str] = (), org: str | None = None, dry_run: bool = False,
              actor: str | None = None, reason: str | None = None) -> dict:
        """Delete now regardless of expiry; held media is never purged."""
        if bool(ids) == (org is not None):
            raise BadInput("give media IDs or --org, not both and not neither.")
        actor = validation.actor(actor or default_actor())
        if reason is not None:
            validation.reason(reason)
        items = MediaItem.__table__
        with self.db.transaction() as session:
            if org is not None:
                validate_id(org, "organization id")
                target = session.get(Organization, org)
                if target is None:
                    raise NotFound(f"organization {org!r} does not exist; nothing was purged.")
                if target.held_at is not None:
                    raise BadInput(f"organization {org!r} is on hold ({target.hold_reason}); release it before purging.")
                scope = items.c.org_id == org
            else:
                found = self._require_items(session, ids)
                scope = items.c.id.in_(list(found))
            rows = session.execute(
                select(items.c.id, items.c.org_id, items.c.state, items.c.held_at, items.c.org_held, items.c.size_bytes).where(scope)
            ).all()
        eligible = [r for r in rows if r.state == State.ACTIVE.value and r.held_at is None and not r.org_held]
        summary = {
            "scope": {"org": org} if org else {"ids": list(dict.fromkeys(ids))},
            "dry_run": dry_run,
            "eligible": len(eligible),
            "eligible_bytes": sum(r.size_bytes for r in eligible),
            "held_skipped": sum(1 for r in rows if r.state == State.ACTIVE.value and (r.held_at is not None or r.org_held)),
            "already_gone": sum(1 for r in rows if r.state != State.ACTIVE.value),
        }
        if dry_run:
            summary["would_delete"] = [r.id for r in eligible[:1000]]
            return summary
        # One event per org whose media is purged, each naming only that org's IDs: a purge by IDs
        # that spans orgs never shows one org's media under another in the audit trail.
        ids_by_org: dict[str, list[str]] = {}
        for row in rows:
            ids_by_org.setdefault(row.org_id, [])
            if not org:
                ids_by_org[row.org_id].append(row.id)
        with self.db.transaction() as session:
            for org_id, org_ids in sorted(ids_by_org.items()) if not org else [(org, [])]:
                session.add(AuditEvent(action="purge", actor=actor, org_id=org_id, reason=reason,
                                       details={"ids": org_ids[:1000],
                                                "eligible": sum(1 for r in eligible if r.org_id == org_id)}))
        counts = self.sweeper.purge_org(org) if org else self.sweeper.purge_ids([r.id for r in eligible])
        # The pipeline counts what it claimed and deleted; holds were tallied above, per item.
        summary.update({name: value for name, value in counts.to_dict().items() if name != "held_skipped"})
        return summary


def store_options(settings: Settings) -> dict:
    return {"delete_threads": settings.delete_threads, "endpoint_url": settings.s3_endpoint_url,
            "delete_mode": settings.s3_delete_mode, "addressing_style": settings.s3_addressing_style,
            "protected": protected_paths(settings)}


def protected_paths(settings: Settings) -> dict[str, Path]:
    """What a filesystem media root must never contain: the data dir and a SQLite catalog file."""
    from sqlalchemy.engine import make_url

    protected: dict[str, Path] = {}
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        protected["the catalog database"] = Path(url.database)
    protected["the data dir (catalog, broker queue)"] = settings.data_dir
    return protected
