"""The catalog API: what an upstream media service imports to register, look up, hold and purge media.

    from worker.engine import build
    catalog = build(get_settings()).catalog
    item = catalog.register(org="acme", file=Path("photo.jpg"), ttl="1h")
    catalog.lookup(item.id)             # the Item while active; raises Gone once expired (unless held), claimed or deleted

One module per use case: `orgs`, `registration` (and `manifest` for imports), `lookup`, `holds`,
`purge`; each returns the frozen values of `results`. `Catalog` is a thin facade over them, wired by
`worker.engine.build`, so an upstream service needs one object. Every use case validates all of its
input before it changes anything, so bad input changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from worker.catalog._shared import default_actor
from worker.catalog.adopt import AdoptSummary, Adopter
from worker.catalog.apikeys import ApiKeys, ApiKeyView, CreatedApiKey
from worker.catalog.audit import AuditEntry, AuditPage, AuditTrail
from worker.catalog.holds import CaseView, Holds
from worker.catalog.lookup import Lookup
from worker.catalog.manifest import MANIFEST_BATCH, MANIFEST_LINE_MAX, ManifestError, ManifestImport, ManifestLineError
from worker.catalog.orgs import Orgs
from worker.catalog.preview import RetentionPreview, preview_retention
from worker.catalog.purge import Purge
from worker.catalog.registration import Registration
from worker.catalog.rules import RetentionRules, RuleChange
from worker.catalog.results import (
    HoldResult,
    Item,
    ManifestSummary,
    OrgView,
    PresignedUrl,
    PurgeResult,
    Tombstone,
)
from worker.db import Database
from worker.store import BlobStore
from worker.sweep import Sweeper

__all__ = [
    "AdoptSummary", "ApiKeyView", "AuditEntry", "AuditPage", "CaseView", "Catalog", "CreatedApiKey", "HoldResult", "RetentionPreview", "Item", "MANIFEST_BATCH", "MANIFEST_LINE_MAX", "ManifestError", "ManifestLineError",
    "ManifestSummary", "OrgView", "PresignedUrl", "PurgeResult", "RetentionRules", "RuleChange", "Tombstone", "default_actor",
]


class Catalog:
    """The use cases of the catalog behind one object; built by `worker.engine.build`."""

    def __init__(self, db: Database, store: BlobStore, sweeper: Sweeper, *, default_retention: timedelta,
                 presign_ttl: timedelta):
        self.db = db
        self.store = store
        self.sweeper = sweeper
        self.binding = sweeper.binding
        self.orgs = Orgs(db, default_retention=default_retention)
        self.registration = Registration(db, store, self.binding)
        self.manifest = ManifestImport(self.registration)
        self.lookups = Lookup(db, store, presign_ttl=presign_ttl)
        self.holds = Holds(db)
        self.purges = Purge(db, sweeper)
        self.api_keys = ApiKeys(db)
        self.audit = AuditTrail(db)
        self.rules = RetentionRules(db)

    def adopter(self, *, progress: Callable[[AdoptSummary], None] | None = None) -> Adopter:
        """`adopt`: registers the store's blobs the catalog does not know (see worker.catalog.adopt)."""
        return Adopter(self.registration, progress=progress)

    def preview_retention(self, org_id: str, retention: str | None) -> RetentionPreview:
        """What `org set ORG --retention D` would make due at the next sweep; changes nothing."""
        return preview_retention(self.db, org_id, retention)

    def set_org(self, org_id: str, retention: str | None = None, *, actor: str | None = None) -> OrgView:
        return self.orgs.set(org_id, retention, actor=actor)

    def show_org(self, org_id: str) -> OrgView:
        return self.orgs.show(org_id)

    def register(self, *, org: str, file: str | Path | None = None, key: str | None = None, media_id: str | None = None,
                 ttl: str | None = None, created_at: str | datetime | None = None, mime: str | None = None,
                 sha256: str | None = None, variants: list[str] | None = None) -> Item:
        return self.registration.register(org=org, file=file, key=key, media_id=media_id, ttl=ttl,
                                          created_at=created_at, mime=mime, sha256=sha256, variants=variants)

    def add_variants(self, media_id: str, keys: list[str], *, actor: str = "cli") -> list:
        """Adopt blobs already in the store as derived files (variants) of an active item."""
        return self.registration.add_variants(media_id, keys, actor=actor)

    def register_manifest(self, path: str | Path, *, files_root: str | Path | None = None, batch_size: int = MANIFEST_BATCH,
                          progress: Callable[[int], None] | None = None) -> ManifestSummary:
        return self.manifest.register_manifest(path, files_root=files_root, batch_size=batch_size, progress=progress)

    def lookup(self, media_id: str) -> Item:
        return self.lookups.lookup(media_id)

    def find(self, media_id: str) -> Item | Tombstone | None:
        return self.lookups.find(media_id)

    def presigned_url(self, media_id: str) -> PresignedUrl:
        return self.lookups.presigned_url(media_id)

    def set_hold(self, *, held: bool, reason: str, ids: Sequence[str] = (), org: str | None = None,
                 actor: str | None = None, case: str | None = None, created_after: str | datetime | None = None,
                 created_before: str | datetime | None = None, mime: str | None = None, include_future: bool = False,
                 release_all: bool = False) -> HoldResult:
        """Place (`held`) or release a hold for `case` (default `default`); see worker.catalog.holds."""
        return self.holds.set_hold(held=held, reason=reason, ids=ids, org=org, actor=actor, case=case,
                                   created_after=created_after, created_before=created_before, mime=mime,
                                   include_future=include_future, release_all=release_all)

    def list_holds(self, *, org: str | None = None, case: str | None = None) -> list[CaseView]:
        """Each case: its placements (who, when, why, scope) and how many active items it holds now."""
        return self.holds.list_cases(org=org, case=case)

    def purge(self, *, ids: Sequence[str] = (), org: str | None = None, dry_run: bool = False,
              actor: str | None = None, reason: str | None = None) -> PurgeResult:
        return self.purges.purge(ids=ids, org=org, dry_run=dry_run, actor=actor, reason=reason)
