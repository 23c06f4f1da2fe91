"""`adopt`: take over a media volume (or bucket) that has no catalog.

Every blob the catalog does not know becomes an item of one org, `created_at` its modification
time, so media already past its retention is deleted by the next sweep (the command says how much
before anything is registered). Streaming: the store's listing is read in pages of ADOPT_BATCH
keys, each page checked against the catalog with one query and registered in one transaction, so
memory stays flat on millions of files. Idempotent and resumable: a key the catalog knows is
skipped, so a re-run after a crash registers only the rest.

Never adopted: leftovers of uploads in flight (the filesystem store's `.incoming-*` files and S3's
unfinished multipart uploads, which listings leave out), blobs modified within the grace (an
upstream service may still be writing them), keys the catalog cannot hold (control characters, the
store's reserved names), and keys a registration holds at that moment: each page's keys are reserved in
the catalog first (never taking over a registration's reservation), checked against the catalog again
and looked at in the store after that (reconcile may have deleted one meanwhile), and only then
registered (worker/reservations.py). So adopt racing a registration or a reconcile skips, never fails.
"""

from __future__ import annotations

import mimetypes
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta

import structlog
from sqlalchemy import select

from worker import items as items_sql
from worker.catalog.registration import Registration, _NewItem
from worker.db import db_now
from config.errors import BadInput, NotFound
from worker.catalog.rules import rules_of
from worker.models import Organization
from worker.policy import lifetime
from worker.store import BlobInfo
from worker.store.keys import validate_id, validate_key, validate_new_key

log = structlog.get_logger("worker.catalog")

# Keys per catalog query and per registering transaction: one `IN` list and one insert of this many
# rows take milliseconds, and a failed batch is cheap to redo.
ADOPT_BATCH = 500
# Progress is reported this often (seconds), whatever the listing's pace.
PROGRESS_EVERY_S = 5.0


@dataclass
class AdoptSummary:
    org: str
    dry_run: bool
    listed: int = 0  # blobs under --under
    known: int = 0  # already in the catalog (live or tombstone): left alone
    adopted: int = 0  # registered (dry run: would be)
    adopted_bytes: int = 0
    due: int = 0  # of those, already past their retention/TTL: the next sweep deletes them
    due_bytes: int = 0
    too_young: int = 0  # modified within the grace: possibly still being written
    unusable_keys: int = 0  # keys the catalog cannot hold
    raced: int = 0  # taken by a registration, or gone from the store, between the listing and the adoption

    def to_dict(self) -> dict:
        return asdict(self)


class Adopter:
    def __init__(self, registration: Registration, *, progress: Callable[[AdoptSummary], None] | None = None):
        self.registration = registration
        self.progress = progress or (lambda summary: None)
        # Seconds between progress reports: a bar on a terminal wants every page (0), a log every few seconds.
        self.progress_every = PROGRESS_EVERY_S

    def run(self, *, org: str, ttl: timedelta | None = None, under: str | None = None, grace: timedelta,
            dry_run: bool = False, actor: str) -> AdoptSummary:
        validate_id(org, "organization id")
        prefix = validate_key(under.strip("/")) + "/" if under else ""
        db = self.registration.db
        with db.transaction() as session:
            target = session.get(Organization, org)
            if target is None:
                raise NotFound(f"organization {org!r} does not exist; create it with `media-retention org set {org}` first.")
            retention = timedelta(seconds=target.retention_seconds)
            org_held = target.held_at is not None
            now = session.scalar(select(db_now()))
            # For the summary's count of what is due at once; each row's expiry is computed again, from the
            # rules read under the org's lock, when the page is registered (Registration.adopt_batch).
            rules = rules_of(session, [org]).get(org, {})

        def item_lifetime(item: _NewItem) -> timedelta:
            return lifetime(item.ttl, retention, rules, item.mime)
        binding = self.registration.binding
        if dry_run:
            state = binding.state()
            if state.marker is not None and not state.bound:
                binding.require()  # another catalog's store: says so, in the sentence every command uses
        else:
            binding.ensure(adopting=True)
        summary = AdoptSummary(org=org, dry_run=dry_run)
        last_progress = time.monotonic()
        for page in self._pages(prefix):
            summary.listed += len(page)
            with db.transaction() as session:
                known = items_sql.known_keys(session, [b.key for b in page])
            summary.known += len(known)
            fresh: list[_NewItem] = []
            for blob in page:
                if blob.key in known:
                    continue
                # The modification time, not the later change time reconcile judges by: every write
                # moves it, so a file still being written is always young, while a volume copied with
                # its times kept (`cp -p`, rsync -t) keeps the ages its media really has.
                written = blob.modification_time
                if written is None or written > now - grace:
                    summary.too_young += 1
                    continue
                try:
                    key = validate_new_key(blob.key)
                except BadInput:
                    summary.unusable_keys += 1
                    continue
                created = min(written, now)
                fresh.append(_NewItem(id=secrets.token_urlsafe(18), org=org, key=key, source=None, ttl=ttl,
                                      created_at=created, mime=mimetypes.guess_type(key)[0] or "application/octet-stream",
                                      sha256=None, size=blob.size))
                if created_due(fresh[-1], item_lifetime(fresh[-1]), now, org_held):
                    summary.due += 1
                    summary.due_bytes += blob.size
            if fresh and not dry_run:
                rows = self.registration.adopt_batch(fresh, {"action": "adopt", "actor": actor, "details": {
                    "under": prefix or None, "ttl_seconds": int(ttl.total_seconds()) if ttl else None}})
                adopted = {row["storage_key"] for row in rows}
                summary.raced += len(fresh) - len(adopted)
                for item in fresh:
                    if item.key not in adopted and created_due(item, item_lifetime(item), now, org_held):
                        summary.due -= 1
                        summary.due_bytes -= item.size
                fresh = [item for item in fresh if item.key in adopted]
            summary.adopted += len(fresh)
            summary.adopted_bytes += sum(item.size for item in fresh)
            if time.monotonic() - last_progress >= self.progress_every:
                self.progress(summary)
                last_progress = time.monotonic()
        log.info("adopt.finished", **summary.to_dict())
        return summary

    def _pages(self, prefix: str) -> Iterator[list[BlobInfo]]:
        page: list[BlobInfo] = []
        for blob in self.registration.store.iter_keys():
            # A versioned bucket's key whose latest entry is a delete marker reads as missing: nothing to adopt.
            if not isinstance(blob, BlobInfo) or not blob.key.startswith(prefix) or not blob.current:
                continue
            page.append(blob)
            if len(page) == ADOPT_BATCH:
                yield page
                page = []
        if page:
            yield page


def created_due(item: _NewItem, lifetime: timedelta, now, org_held: bool) -> bool:
    """Whether the next sweep deletes this adopted item (past its lifetime, its org not held)."""
    return item.created_at + lifetime <= now and not org_held
