"""Manifest import: register every line of a JSON-lines file, checked whole first, then in batches.

A manifest is how an existing catalog is imported: every bad line is reported by number and none
imports anything; re-running a manifest that a crash cut short imports the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import pickle
import secrets
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import structlog
from sqlalchemy import select

from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor
from worker.catalog.registration import Registration, _NewItem, _NewVariant, _open_regular, _source_digest
from worker.catalog.results import ManifestSummary
from config.errors import BadInput, RetentionError
from worker.models import Organization
from worker.store.keys import key_for_id

log = structlog.get_logger("worker.catalog")

# Manifest rows written per transaction: 2,000 rows are one COPY of a few hundred kilobytes and a
# transaction of tens of milliseconds, so a million-line import is 500 commits; a failed batch is
# cheap to redo. Files are copied in a batch at a time too, made durable by two syncs per batch.
MANIFEST_BATCH = 2000
# A manifest line is a few hundred bytes; the bound keeps a file without newlines (a binary, a huge
# single line) from being read into memory whole.
MANIFEST_LINE_MAX = 64 * 1024
# Bad lines kept by number for the report; the count covers all of them.
MANIFEST_ERRORS_KEPT = 1000
# Store lookups in flight while checking a manifest: an S3 HEAD is a round trip, a local stat is not.
MANIFEST_STORE_CHECKS = 8
# Batches written at once, each in its own transaction: while one waits on the database (its COPY, its
# commit) the next one's rows are built. Commits may then land out of order, which a re-run does not
# mind: it skips every line that committed. (docs/performance.md: what this and the import's other
# changes measured.)
MANIFEST_WRITERS = 2
_MANIFEST_FIELDS = {"org", "id", "file", "key", "ttl", "created_at", "mime", "sha256", "variants"}


class _DuplicateField(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refused if a name appears twice: json.loads would keep the last value silently, so
    a line could say one org to a reviewer and import into another."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for name, _value in pairs:
            if name in seen:
                raise _DuplicateField(name)
            seen.add(name)
    return row


_decode_line = json.JSONDecoder(object_pairs_hook=_object_without_duplicates).decode


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


def files_root_path(path: str | Path) -> Path:
    """The directory a manifest's `file` lines may read from, resolved (symlinks included): an existing
    directory, and not `/` (that would confine nothing)."""
    root = Path(os.path.realpath(path))
    if not root.is_dir():
        raise BadInput(f"--files-root {str(path)!r} is not a directory.")
    if root == Path(root.anchor):
        raise BadInput("--files-root / confines nothing: name the directory the manifest's files are in.")
    return root


def _default_files_root(manifest: Path) -> Path | None:
    """The manifest's own directory, resolved; None when that is `/` (it would confine nothing)."""
    root = Path(os.path.realpath(manifest)).parent
    return None if root == Path(root.anchor) else root


def _confined(file: str, files_root: Path | None) -> Path:
    """A `file` line's path, relative ones read from the files root; refused unless it resolves (symlinks
    included) inside the root. A manifest is data another system may produce: without this, a line could
    import /etc/shadow or ../../secrets and have them served by lookups."""
    if files_root is None:
        raise BadInput("a 'file' line needs --files-root DIR, the directory its files may be read from "
                       "(the manifest's own directory is /, which would confine nothing)")
    if "\x00" in file:
        raise BadInput("field 'file' contains a NUL byte")
    resolved = Path(os.path.realpath(files_root / file))  # an absolute `file` replaces the root in the join
    if not resolved.is_relative_to(files_root):
        raise BadInput(f"file {file!r} is outside the files root {str(files_root)!r}")
    return resolved


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



class ManifestImport:
    def __init__(self, registration: Registration):
        self.registration = registration
        self.db = registration.db
        self.store = registration.store

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
                row = _decode_line(text)
            except _DuplicateField as exc:
                yield number, ManifestLineError(number, f"field {str(exc)!r} appears more than once")
                continue
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

    def _validate_manifest_row(self, row: dict, files_root: Path | None, now: datetime) -> _NewItem:
        if not isinstance(row.get("org"), str):
            raise BadInput("field 'org' is required and must be a string")
        for name in ("id", "file", "key", "ttl", "created_at", "mime", "sha256"):
            if row.get(name) is not None and not isinstance(row[name], str):
                raise BadInput(f"field {name!r} must be a string")
        variants = row.get("variants")
        if variants is not None and not (isinstance(variants, list) and all(isinstance(key, str) for key in variants)):
            raise BadInput("field 'variants' must be a list of storage keys (strings)")
        file = row.get("file")
        if file is not None:
            file = _confined(file, files_root)
        return self.registration.validate_new(org=row["org"], file=file, key=row.get("key"), media_id=row.get("id"), ttl=row.get("ttl"),
                                  created_at=row.get("created_at"), mime=row.get("mime"), sha256=row.get("sha256"), now=now,
                                  variants=variants)

    def register_manifest(self, path: str | Path, *, files_root: str | Path | None = None, batch_size: int = MANIFEST_BATCH,
                          progress: Callable[[int], None] | None = None) -> ManifestSummary:
        """Import a JSON-lines manifest. `file` lines are read only from inside `files_root` (relative ones
        from it), by default the manifest's own directory, where relative paths have always been read from
        (a manifest in `/` has no default: its `file` lines are bad lines).

        First every line is checked, against the database *and* the store, and any bad line (each
        reported by number) imports nothing. Then rows go in batches, each all-or-nothing. A line
        whose ID is already registered exactly as the line describes is skipped, and a file whose
        key already holds its very bytes adopts them, so re-running a manifest that a crash cut
        short imports the rest.

        The check writes each good line, parsed and validated, to a spool file (unlinked from the
        start, so a crash leaves nothing); the import reads the spool back instead of parsing and
        validating every line a second time.

        Memory: the check keeps each line's media ID and storage key with its line number, to find
        duplicates within the file (about 300 bytes a line: some 300 MB for a million lines); rows
        themselves are read, checked and written a batch at a time."""
        path = Path(path)
        root = files_root_path(files_root) if files_root is not None else _default_files_root(path)
        with _open_regular(path, "manifest") as handle, tempfile.TemporaryFile(prefix="media-retention-manifest-") as spool:
            seen = os.fstat(handle.fileno())
            check = _ManifestCheck(now=self.registration.database_now())
            chunk: list[tuple[int, _NewItem, bool]] = []
            with ThreadPoolExecutor(MANIFEST_STORE_CHECKS, thread_name_prefix="manifest-check") as pool:
                for number, row in self._manifest_lines(handle):
                    check.lines += 1
                    item = self._check_manifest_line(check, number, row, root)
                    if item is not None:
                        chunk.append((number, item, row.get("id") is not None))
                    if len(chunk) == batch_size:
                        self._check_manifest_chunk(check, chunk, pool, spool)
                        chunk = []
                if chunk:
                    self._check_manifest_chunk(check, chunk, pool, spool)
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
            spool.seek(0)
            summary = self._import_manifest(spool, path, batch_size, progress)
        log.info("manifest.imported", path=str(path), items=summary["imported"], bytes=summary["bytes"],
                 already_registered=summary["already_registered"])
        return ManifestSummary(**summary)

    def _check_manifest_line(self, check: "_ManifestCheck", number: int, row: dict | ManifestLineError,
                             files_root: Path | None) -> _NewItem | None:
        """What one line alone (and the lines before it) can tell; None when the line is bad."""
        if isinstance(row, ManifestLineError):
            check.error(number, row.message)
            return None
        try:
            item = self._validate_manifest_row(row, files_root, check.now)
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
        for variant in item.variants:  # keys are unique across items and variants, within the file too
            if variant.key in check.keys:
                check.error(number, f"duplicate key {variant.key!r} (first on line {check.keys[variant.key]})")
                return None
            check.keys[variant.key] = number
        check.orgs.setdefault(item.org, number)
        return item

    def _check_manifest_chunk(self, check: "_ManifestCheck", chunk: list[tuple[int, _NewItem, bool]], pool: ThreadPoolExecutor,
                              spool: BinaryIO) -> None:
        """Check a chunk of lines against the catalog (IDs and keys taken) and the store (a key's blob
        exists; a file's target key is free or already holds its very bytes); spool the good ones."""
        sql = self.db.sql
        with self.db.transaction() as session:
            by_id = {row.id: row for row in items_sql.existing(
                session, sql, "id", [item.id for _, item, explicit in chunk if explicit])}
            key_owner = dict(items_sql.existing(
                session, sql, "storage_key", [item.key for _, item, _ in chunk], "storage_key", "id"))
            # Any key of a line (its own or a variant's) that is already a variant of some item.
            taken = items_sql.known_keys(session, [key for _, item, _ in chunk for key in item.keys])
        to_store: list[tuple[int, _NewItem, bool]] = []
        records: list[tuple] = []
        for number, item, explicit in chunk:
            existing = by_id.get(item.id) if explicit else None
            if existing is not None:
                if not _describes(item, existing):
                    check.error(number, f"media id {item.id!r} already exists with other content")
                else:
                    records.append(_spooled(number, item, explicit, registered=True))
                continue  # already registered exactly so: the import skips it
            if key_owner.get(item.key) is not None:
                check.error(number, f"storage key {item.key!r} already belongs to another item")
                continue
            used = next((key for key in item.keys if key in taken), None)
            if used is not None:
                check.error(number, f"storage key {used!r} already belongs to another item or variant")
                continue
            if item.source is None or explicit:
                to_store.append((number, item, explicit))
            else:
                records.append(_spooled(number, item, explicit))
        variants = [(number, variant) for number, item, _ in to_store for variant in item.variants]
        missing_variant: dict[int, str] = {}
        for (number, variant), info in zip(variants, self.store.stat_many([v.key for _, v in variants]) if variants else [],
                                           strict=True):
            if isinstance(info, RetentionError):
                missing_variant.setdefault(number, f"variant key {variant.key!r}: {info}")
            elif info is None:
                missing_variant.setdefault(number, f"no blob at variant key {variant.key!r}")
        for (number, item, explicit), (problem, size) in zip(to_store, self._store_problems(
                [item for _, item, _ in to_store], pool), strict=True):
            problem = problem or missing_variant.get(number)
            if problem:
                check.error(number, problem)
            else:
                item.size = size
                records.append(_spooled(number, item, explicit))
        if not check.errors:  # once a line is bad nothing will be imported: no need to spool more
            records.sort()
            pickle.dump(records, spool, protocol=pickle.HIGHEST_PROTOCOL)

    def _store_problems(self, items: list[_NewItem], pool: ThreadPoolExecutor) -> list[tuple[str | None, int | None]]:
        """For each line, why the store cannot take it (or None) and the size of a key line's blob. Key lines
        are asked in one `stat_many` (the store knows how to ask fast); file lines with an ID, whose target
        may hold the bytes of a run that was cut short, one by one on the pool."""
        keyed = [item for item in items if item.source is None]
        answers = dict(zip((id(item) for item in keyed), self.store.stat_many([item.key for item in keyed]), strict=True))
        files = [item for item in items if item.source is not None]
        file_answers = dict(zip((id(item) for item in files), pool.map(self._file_problem, files), strict=True))
        problems: list[tuple[str | None, int | None]] = []
        for item in items:
            if item.source is not None:
                problems.append((file_answers[id(item)], None))
                continue
            info = answers[id(item)]
            if isinstance(info, RetentionError):
                problems.append((str(info).rstrip("."), None))
            elif info is None:
                problems.append((f"no blob at storage key {item.key!r}", None))
            else:
                problems.append((None, info.size))
        return problems

    def _file_problem(self, item: _NewItem) -> str | None:
        """Why a file line's target key cannot take the file, or None (free, or already its very bytes)."""
        try:
            if self.store.stat(item.key) is None:
                return None
            if self.store.digest(item.key) != _source_digest(item.source):
                return f"storage key {item.key!r} already holds a different blob"
            return None  # the very bytes, left by a run that was cut short: adopted at import
        except RetentionError as exc:
            return str(exc).rstrip(".")

    def _import_manifest(self, spool: BinaryIO, path: Path, batch_size: int, progress: Callable[[int], None] | None) -> dict:
        """Write the spooled lines batch by batch, MANIFEST_WRITERS batches at once (each its own transaction
        on its own connection), and report progress as batches commit, in order. A failed batch stops the
        import: once its error is seen no batch starts, the ones in flight are waited for (and counted when
        they commit), then the error is raised. A re-run skips every line that committed."""
        summary = {"imported": 0, "already_registered": 0, "bytes": 0, "manifest": str(path)}
        actor = validation.actor(default_actor())
        audit = {"action": "import", "actor": actor, "details": {"manifest": path.name}}
        in_flight: deque[Future] = deque()

        def write(batch: list[_NewItem]) -> tuple[int, int]:
            for item in batch:
                if item.id is None:  # drawn at import, after the already-registered check
                    item.id = secrets.token_urlsafe(18)
                    if item.source is not None:
                        item.key = key_for_id(item.id)
            rows = self.registration.write_batch(batch, audit, purpose="import", checked=True)
            return len(rows), sum(row["size_bytes"] for row in rows)

        def settle(keep: int) -> None:
            """Wait for committed batches, oldest first, until at most `keep` are in flight."""
            while len(in_flight) > keep:
                imported, size = in_flight.popleft().result()
                summary["imported"] += imported
                summary["bytes"] += size
                if progress:
                    progress(summary["imported"])

        def batches() -> Iterator[list[_NewItem]]:
            """The spooled lines still to import, a batch at a time (the already registered only counted)."""
            batch: list[_NewItem] = []
            for record in _unspool(spool):
                item, registered = _unspooled(record)
                if registered:
                    summary["already_registered"] += 1
                    continue
                batch.append(item)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        with ThreadPoolExecutor(MANIFEST_WRITERS, thread_name_prefix="manifest-write") as writers:
            try:
                for batch in batches():
                    settle(MANIFEST_WRITERS - 1)
                    in_flight.append(writers.submit(contextvars.copy_context().run, write, batch))
                settle(0)
            except BaseException as exc:
                # The batches still in flight finish (or fail) before the first error is raised: the progress
                # reported is what committed, and no transaction outlives the command.
                while in_flight:
                    with contextlib.suppress(BaseException):
                        settle(len(in_flight) - 1)
                if isinstance(exc, BadInput) and summary["imported"]:
                    # Bad input changes nothing, and this import has changed something: a failure (exit 1).
                    raise RetentionError(f"{str(exc).rstrip('.')}; {summary['imported']} items of the manifest were "
                                         f"imported before it (a re-run skips them and names the line).") from exc
                raise
        return summary


def _spooled(number: int, item: _NewItem, explicit: bool, *, registered: bool = False) -> tuple:
    """A checked line as the import reads it back: plain values, in line order."""
    return (number, item.id if explicit else None, item.org, item.key, str(item.source) if item.source else None,
            int(item.ttl.total_seconds()) if item.ttl else None, item.created_at, item.mime, item.sha256, item.size,
            registered, [(variant.key, variant.mime) for variant in item.variants])


def _unspooled(record: tuple) -> tuple[_NewItem, bool]:
    _number, media_id, org, key, source, ttl, created_at, mime, sha256, size, registered, variants = record
    return _NewItem(id=media_id, org=org, key=key, source=Path(source) if source else None,
                    ttl=timedelta(seconds=ttl) if ttl else None, created_at=created_at, mime=mime, sha256=sha256,
                    size=size, variants=[_NewVariant(key, mime) for key, mime in variants]), registered


def _unspool(spool: BinaryIO) -> Iterator[tuple]:
    while True:
        try:
            records = pickle.load(spool)
        except EOFError:
            return
        yield from records
