"""The catalog: organizations, media items (live rows and tombstones) and the audit trail."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.items import predicates
from worker.db import UTCDateTime, db_now

# 128 matches the media ID alphabet limit; 1024 is S3's own key limit in bytes.
ID_LENGTH = 128
KEY_LENGTH = 1024


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class State(str, enum.Enum):
    ACTIVE = "active"
    DELETING = "deleting"  # claimed: lookups answer 404 from here on
    DELETED = "deleted"  # tombstone: the blob is gone


class Reason(str, enum.Enum):
    TTL = "ttl"
    RETENTION = "retention"
    PURGE = "purge"
    ORG_PURGE = "org_purge"
    MISSING_BLOB = "missing_blob"


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    retention_seconds: Mapped[int] = mapped_column(Integer)
    held_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    hold_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())

    __table_args__ = (CheckConstraint("retention_seconds >= 3600", name="retention_at_least_1h"),)


# Row predicates the partial indexes are built on (worker/items/predicates.py); queries use the same text so planners match them.
CLAIMABLE = predicates.predicate(predicates.CLAIMABLE)
HELD = predicates.predicate(predicates.HELD)
DELETING = predicates.predicate(predicates.DELETING)
TOMBSTONE = predicates.predicate(predicates.TOMBSTONE)
LIVE = predicates.predicate(predicates.LIVE)


class RetentionRule(Base):
    """An org's retention for a content type (`org rule set ORG --mime image/* --retention 30d`): the most
    specific rule matching an item's MIME type wins over the org's period, and a TTL over every rule
    (worker/policy.py, `lifetime`). Written only under the org's row lock, in the transaction that rewrites
    the expiry of the items the change affects (worker/catalog/rules.py)."""

    __tablename__ = "retention_rules"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    # `type/subtype` or `type/*`, lowercase (worker/policy.py, parse_mime_pattern).
    mime_pattern: Mapped[str] = mapped_column(String(255), primary_key=True)
    retention_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    actor: Mapped[str] = mapped_column(String(128))

    __table_args__ = (CheckConstraint("retention_seconds >= 3600", name="retention_at_least_1h"),)


class MediaItem(Base):
    __tablename__ = "media_items"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    # Byte order on PostgreSQL too (migration 0005), so the unique index lists keys the way stores do.
    storage_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH).with_variant(String(KEY_LENGTH, collation="C"), "postgresql"), unique=True
    )
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mime_type: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ttl_seconds: Mapped[int | None] = mapped_column(Integer)
    # Denormalised so the sweep's claim is one index range scan; `org set` rewrites it for the
    # org's TTL-less active items when the retention changes.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(16), default=State.ACTIVE.value)
    held_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    hold_reason: Mapped[str | None] = mapped_column(Text)
    # Mirrors the org's hold on each of its active rows (kept in step by hold/release and register),
    # so held rows can stay out of the claim index: a large held backlog then costs a claim nothing.
    # The claim still checks the org row itself; this flag is for speed, not for correctness.
    org_held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Set when claimed: the reason the item goes, the claim's owner and when another may take it over.
    deletion_reason: Mapped[str | None] = mapped_column(String(16))
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When reconcile first found this active item's blob missing (database clock); cleared when the
    # blob is seen again. An unheld item is tombstoned once that is a grace period old or it expired.
    missing_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The version ID a versioned bucket gave the blob (migration 0010); NULL on an unversioned store or for
    # rows recorded before versions were. Deletes remove exactly this version.
    blob_version: Mapped[str | None] = mapped_column(String(KEY_LENGTH))
    # While the store refuses to delete the blob's version because it is locked (S3 Object Lock): until when
    # (NULL for a legal hold, which has no date) and why ('retention', 'legal_hold').
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lock_reason: Mapped[str | None] = mapped_column(String(32))
    # True once the item owns a variant (set in the variant insert's transaction, never cleared): the claim
    # returns it, so the sweep reads variants only for the items that have some (migration 0011).
    has_variants: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    __table_args__ = (
        CheckConstraint("state IN ('active', 'deleting', 'deleted')", name="state_known"),
        CheckConstraint("ttl_seconds IS NULL OR ttl_seconds BETWEEN 3600 AND 2592000", name="ttl_bounds"),
        CheckConstraint("size_bytes >= 0", name="size_not_negative"),
        # The sweep's two claim predicates, each a partial index so tombstones and held media cost nothing.
        Index(
            "ix_media_items_claimable_expiry",
            "expires_at",
            postgresql_where=text(CLAIMABLE),
            sqlite_where=text(CLAIMABLE),
        ),
        # Held media by expiry, for the held_skipped count of every sweep.
        Index(
            "ix_media_items_held_expiry",
            "expires_at",
            postgresql_where=text(HELD),
            sqlite_where=text(HELD),
        ),
        Index(
            "ix_media_items_deleting_lease",
            "lease_until",
            postgresql_where=text(DELETING),
            sqlite_where=text(DELETING),
        ),
        # An org's live rows (not tombstones) by state: org show, org set, org holds, org purges (migration
        # 0014). A tombstone has no entry here, so the sweep's one write per deletion inserts nothing into it.
        Index(
            "ix_media_items_live_org_id_state",
            "org_id",
            "state",
            postgresql_where=text(LIVE),
            sqlite_where=text(LIVE),
        ),
        # Tombstones by deletion time: status' lateness figures, and tombstone compaction.
        Index(
            "ix_media_items_deleted_at",
            "deleted_at",
            postgresql_where=text(TOMBSTONE),
            sqlite_where=text(TOMBSTONE),
        ),
        Index(
            "ix_media_items_missing_since",
            "missing_since",
            postgresql_where=text("missing_since IS NOT NULL"),
            sqlite_where=text("missing_since IS NOT NULL"),
        ),
    )

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "org": self.org_id,
            "key": self.storage_key,
            "size": self.size_bytes,
            "mime": self.mime_type,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "ttl_seconds": self.ttl_seconds,
            "expires_at": self.expires_at.isoformat(),
            "state": self.state,
            "held": self.held_at is not None,
        }


class MediaVariant(Base):
    """A derived blob an item owns (a thumbnail, a preview, a transcode): it lives and goes with its item.

    Its key is unique among variants here and, through the catalog's key reservations (worker/reservations.py),
    never equal to an item's key: whoever registers a key checks both tables while holding its reservation.
    The row stays with its item's tombstone (so reconcile and verify still know the key belongs to a gone item)
    and is removed with it by compaction."""

    __tablename__ = "media_variants"

    storage_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH).with_variant(String(KEY_LENGTH, collation="C"), "postgresql"), primary_key=True
    )
    item_id: Mapped[str] = mapped_column(ForeignKey("media_items.id"))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    mime_type: Mapped[str] = mapped_column(String(255))
    # As media_items.blob_version: the version a versioned bucket gave this blob, NULL when not recorded.
    blob_version: Mapped[str | None] = mapped_column(String(KEY_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())

    __table_args__ = (
        CheckConstraint("size_bytes >= 0", name="size_not_negative"),
        Index("ix_media_variants_item_id", "item_id"),
    )

    def to_dict(self) -> dict:
        return {"key": self.storage_key, "size": self.size_bytes, "mime": self.mime_type}


class KeyReservation(Base):
    """A storage key taken in the catalog by whoever is about to write, adopt or delete its blob.

    The catalog's arbitration of blob ownership (worker/reservations.py): a registration reserves its keys
    (committed) before it writes or adopts a byte under them and consumes the reservations in the
    transaction that inserts its rows; reconcile reserves a key (uncommitted, in the transaction that
    deletes the blob) before it deletes an orphan. Whoever holds a key's reservation is the only one that
    may delete a blob it wrote there."""

    __tablename__ = "key_reservations"

    storage_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH).with_variant(String(KEY_LENGTH, collation="C"), "postgresql"), primary_key=True
    )
    # The holder: a registration's or reconcile's token; a takeover writes its own.
    token: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str] = mapped_column(String(16))  # register | import | adopt | reconcile
    media_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    reserved_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())

    __table_args__ = (Index("ix_key_reservations_token", "token"),)


class CatalogIdentity(Base):
    """This catalog's identity (one row, made by the migration that created the table). A store carries
    a marker naming the catalog it belongs to; destructive commands act only on a store whose marker
    names this identity (worker/binding.py)."""

    __tablename__ = "catalog_identity"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    # The store this catalog bound (informational: the marker in the store is what is checked).
    store_url: Mapped[str | None] = mapped_column(Text)
    bound_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Hold(Base):
    """One placement of a legal hold by a case (migration 0013): on named items (`item`), on a whole org
    (`org`), or on an org's items matching a query (`query`: a half-open `created_at` window and an optional
    MIME pattern; with `include_future`, media registered later that matches is held from its registration).

    What the claim reads is resolved from these rows when they change, never joined at claim time (DESIGN
    invariant 7): an item's `held_at` is set while a `hold_items` row of an open placement names it, and an
    org's active rows carry `org_held` while an open `org` placement names the org. Released placements stay
    (the audit of who placed and released what); their `hold_items` rows are deleted on release, so every
    `hold_items` row belongs to an open placement."""

    __tablename__ = "holds"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    case_name: Mapped[str] = mapped_column(String(ID_LENGTH))
    scope: Mapped[str] = mapped_column(String(8))  # item | org | query
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"))  # org and query scopes
    created_after: Mapped[datetime | None] = mapped_column(UTCDateTime())  # query: created_at >= this
    created_before: Mapped[datetime | None] = mapped_column(UTCDateTime())  # query: created_at < this
    mime_pattern: Mapped[str | None] = mapped_column(String(255))  # query: `type/subtype` or `type/*`, lower case
    include_future: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    reason: Mapped[str] = mapped_column(Text)
    placed_by: Mapped[str] = mapped_column(String(128))
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    released_by: Mapped[str | None] = mapped_column(String(128))
    release_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("scope IN ('item', 'org', 'query')", name="scope_known"),
        CheckConstraint("scope = 'item' OR org_id IS NOT NULL", name="org_scoped"),
        Index("ix_holds_case_name", "case_name"),
        # What a registration reads under its org's share lock: the org's open placements that hold future media.
        Index("ix_holds_open_future", "org_id", postgresql_where=text("released_at IS NULL AND include_future"),
              sqlite_where=text("released_at IS NULL AND include_future")),
    )


class HoldItem(Base):
    """An item held by an open item or query placement (the row is deleted when the placement releases it).
    No foreign key to media_items: a held item is never deleted, and compaction must never fail on a row
    it cannot see."""

    __tablename__ = "hold_items"

    hold_id: Mapped[int] = mapped_column(ForeignKey("holds.id"), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)

    __table_args__ = (Index("ix_hold_items_item_id", "item_id"),)


class AuditEvent(Base):
    """Who did what and why: holds, releases, purges and policy changes."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    org_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    media_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict | None] = mapped_column(JSON)

    __table_args__ = (Index("ix_audit_events_org_id_at", "org_id", "at"),)


class SweepRun(Base):
    """One sweep: when it ran, who ran it and what it did. Scheduled sweeps carry their schedule
    slot, unique, so a second beat's message for the same slot finds it taken and does nothing."""

    __tablename__ = "sweep_runs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # scheduled | manual
    slot: Mapped[str | None] = mapped_column(String(64), unique=True)
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    fanout: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Totals of the run, fan-out drains included (each drain adds its own counts when it ends).
    claimed: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    deleted: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    failed: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    bytes_freed: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    held_skipped: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))

    __table_args__ = (Index("ix_sweep_runs_started_at", "started_at"),)


class VolumeSample(Base):
    """One measurement of the media volume, by the database clock, so every worker projects from the same series."""

    __tablename__ = "volume_samples"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    used_bytes: Mapped[int] = mapped_column(BigInteger)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    used_inodes: Mapped[int | None] = mapped_column(BigInteger)
    total_inodes: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_volume_samples_taken_at", "taken_at"),)


class VolumeAlert(Base):
    """The fleet's one alert state per volume. Every change is a compare-and-set on `version`."""

    __tablename__ = "volume_alerts"

    volume: Mapped[str] = mapped_column(String(64), primary_key=True)
    level: Mapped[str] = mapped_column(String(16), default="ok")
    reason: Mapped[str | None] = mapped_column(String(16))
    since: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    # The level before the last change, kept so a resolved notice can be sent (or re-sent) for it.
    previous_level: Mapped[str] = mapped_column(String(16), default="ok")
    previous_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # True from a notification until its webhook delivery succeeded; a later check re-sends it.
    delivery_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    version: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    __table_args__ = (
        CheckConstraint("level IN ('ok', 'warning', 'critical')", name="level_known"),
        CheckConstraint("previous_level IN ('ok', 'warning', 'critical')", name="previous_level_known"),
    )


class ApiKey(Base):
    """An org-scoped key for the HTTP lookup service. Only a hash of its secret is stored."""

    __tablename__ = "api_keys"

    # The public half of a key: named in listings and revocations, and the first part of the token.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    name: Mapped[str | None] = mapped_column(String(128))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=db_now())
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (Index("ix_api_keys_org_id", "org_id"),)
