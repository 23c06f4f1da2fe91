"""What the catalog's use cases return: frozen values an edge (the CLI, the HTTP layer) renders.

`to_dict()` is the one rendering every edge shares (the CLI's `--json` and text output); the 404
body of a lookup is built at the edges from a `Tombstone` (see `worker.responses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from worker.sweep import SweepCounts


@dataclass(frozen=True)
class Variant:
    """A derived blob of an item (thumbnail, preview), as lookups list it; `url` only when presigned."""

    key: str
    size: int
    mime: str
    url: str | None = None

    def to_dict(self) -> dict:
        data = {"key": self.key, "size": self.size, "mime": self.mime}
        if self.url is not None:
            data["url"] = self.url
        return data


@dataclass(frozen=True)
class Item:
    """A media item as the catalog answers for it."""

    id: str
    org: str
    key: str
    size: int
    mime: str | None
    sha256: str | None
    created_at: datetime
    ttl_seconds: int | None
    expires_at: datetime
    state: str
    # Lookups report whether the item is held; a registration does not (None), as it always did.
    held: bool | None = None
    # What a lookup read along with the item, so that a presigned URL ends by the database clock and never
    # outlives the item: the database's time of the read (None from a registration), and whether a hold,
    # its own or its org's, keeps it past its expiry. Neither is rendered.
    as_of: datetime | None = field(default=None, compare=False)
    kept_by_hold: bool = field(default=False, compare=False)
    # The item's derived blobs; None where not read (a manifest import), rendered only when there are some.
    variants: tuple[Variant, ...] | None = None

    @classmethod
    def from_row(cls, row, as_of: datetime | None = None, variants: tuple[Variant, ...] | None = None) -> "Item":
        """From a `MediaItem` (a lookup, which reports holds) read at the database time `as_of`, with `variants`."""
        return cls(id=row.id, org=row.org_id, key=row.storage_key, size=row.size_bytes, mime=row.mime_type,
                   sha256=row.sha256, created_at=row.created_at, ttl_seconds=row.ttl_seconds, expires_at=row.expires_at,
                   state=row.state, held=row.held_at is not None, as_of=as_of,
                   kept_by_hold=row.held_at is not None or bool(row.org_held), variants=variants)

    def to_dict(self) -> dict:
        data = {
            "id": self.id,
            "org": self.org,
            "key": self.key,
            "size": self.size,
            "mime": self.mime,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "ttl_seconds": self.ttl_seconds,
            "expires_at": self.expires_at.isoformat(),
            "state": self.state,
        }
        if self.held is not None:
            data["held"] = self.held
        if self.variants:
            data["variants"] = [variant.to_dict() for variant in self.variants]
        return data


@dataclass(frozen=True)
class Tombstone:
    """What a lookup answers 404 from: an item claimed for deletion or deleted, or one past its expiry
    (database clock) and unheld that no sweep has claimed yet."""

    id: str
    state: str  # `deleting`, `deleted`, or `expired` (still active in the catalog, gone all the same)
    reason: str | None
    deleted_at: datetime  # when it was deleted, claimed while the deletion is in flight, or expired


@dataclass(frozen=True)
class OrgView:
    """An organization: its retention, hold and item counts."""

    org: str
    retention: str
    retention_seconds: int
    held: bool
    hold_reason: str | None
    items: dict[str, int]  # live state (active, deleting) -> count; tombstones are not counted
    active_bytes: int
    rules: tuple[dict, ...] = ()  # retention rules by content type: mime, retention, retention_seconds

    def to_dict(self) -> dict:
        return {
            "org": self.org,
            "retention": self.retention,
            "retention_seconds": self.retention_seconds,
            "held": self.held,
            "hold_reason": self.hold_reason,
            "items": dict(self.items),
            "active_bytes": self.active_bytes,
            "rules": [dict(rule) for rule in self.rules],
        }


@dataclass(frozen=True)
class HoldResult:
    """A hold or release: what was asked, and what it changed."""

    action: str  # "hold" or "release"
    org: str | None
    ids: tuple[str, ...]
    changed: tuple[str, ...]
    reason: str
    actor: str
    case: str = "default"  # the case placed or released (worker/catalog/holds.py DEFAULT_CASE without --case)
    scope: str = "item"  # item | org | query (a placement); item | org | case (a release)
    holds: tuple[int, ...] = ()  # the placements created or released
    items: int = 0  # a placement: the items it holds now; a release: the items it left unheld

    def to_dict(self) -> dict:
        return {"action": self.action, "org": self.org, "ids": list(self.ids), "changed": list(self.changed),
                "reason": self.reason, "actor": self.actor, "case": self.case, "scope": self.scope,
                "holds": list(self.holds), "items": self.items}


@dataclass(frozen=True)
class PurgeResult:
    """A purge (or its dry run): what was eligible, and what the pipeline did with it."""

    org: str | None
    ids: tuple[str, ...]
    dry_run: bool
    eligible: int
    eligible_bytes: int
    held_skipped: int
    already_gone: int
    would_delete: tuple[str, ...] | None = None  # dry runs: the first eligible items by name
    counts: SweepCounts | None = None  # real runs: what the pipeline claimed and deleted
    # Real runs, read after the pipeline: eligible items its claims did not take because a hold placed
    # since the count kept them, or because someone else (a sweep, another purge, reconcile) claimed them
    # first; and items an org purge took that were not eligible at the count (registered or released since).
    held_since_count: int = 0
    gone_since_count: int = 0
    added_since_count: int = 0

    @property
    def failed(self) -> int:
        return self.counts.failed if self.counts else 0

    def to_dict(self) -> dict:
        data = {
            "scope": {"org": self.org} if self.org else {"ids": list(self.ids)},
            "dry_run": self.dry_run,
            "eligible": self.eligible,
            "eligible_bytes": self.eligible_bytes,
            "held_skipped": self.held_skipped,
            "already_gone": self.already_gone,
        }
        if self.would_delete is not None:
            data["would_delete"] = list(self.would_delete)
        if self.counts is not None:
            # The pipeline counts what it claimed and deleted; holds were tallied per item, above.
            data.update({name: value for name, value in self.counts.to_dict().items() if name != "held_skipped"})
            data.update(held_since_count=self.held_since_count, gone_since_count=self.gone_since_count,
                        added_since_count=self.added_since_count)
        return data


@dataclass(frozen=True)
class ManifestSummary:
    """A finished manifest import."""

    imported: int
    already_registered: int
    bytes: int
    manifest: str

    def to_dict(self) -> dict:
        return {"imported": self.imported, "already_registered": self.already_registered, "bytes": self.bytes,
                "manifest": self.manifest}


@dataclass(frozen=True)
class PresignedUrl:
    """A presigned GET URL for an active item (object stores only)."""

    id: str
    url: str
    expires_in: int
    expires_at: datetime
    # The item's variants, each with its own URL valid exactly as long as the item's.
    variants: tuple[Variant, ...] = ()

    def to_dict(self) -> dict:
        data = {"id": self.id, "url": self.url, "expires_in": self.expires_in, "expires_at": self.expires_at.isoformat()}
        if self.variants:
            data["variants"] = [variant.to_dict() for variant in self.variants]
        return data

    @property
    def urls(self) -> tuple[str, ...]:
        """Every URL this answer carries (the item's and its variants'): printed whole, being what was asked for."""
        return (self.url, *(variant.url for variant in self.variants if variant.url))
