"""The HTTP lookup's one statement: an API key, the item that key may see, the item's variants and the
database's clock, read together in one round trip (`media-retention serve`, worker/catalog/keyed_lookup.py).

Two primary-key reads in two transactions (the key, then the item) cost four round trips and two pool
checkouts a request; as one statement in autocommit they cost one. The statement is driven by a one-row
subquery of its parameters, so it answers exactly one row whatever exists: the key's columns NULL for an
unknown or revoked key, the item's NULL when the key's secret does not match, the ID was never registered or
belongs to another org (joined on the key's org, so another org's item is never even read).

Written as text for the driver itself (psycopg's `%(name)s` or sqlite3's `:name`): it is run on the
lookup's own connections, outside SQLAlchemy, where the per-statement cost of the ORM was most of a
lookup's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import NamedTuple

from worker.db import UTCDateTime, db_now
from worker.dialect import Dialect

_UTC = UTCDateTime()


def keyed_lookup_sql(dialect: Dialect) -> str:
    """The statement, in `dialect`'s driver's parameter style; parameters `key_id`, `digest` (the SHA-256 of
    the presented secret, hex) and `media_id`. Columns in `KeyedRow`'s order."""
    if dialect.postgresql:
        key_id, digest, media_id = "%(key_id)s::text", "%(digest)s::text", "%(media_id)s::text"
        variants = "json_agg(json_build_array(v.storage_key, v.size_bytes, v.mime_type))"
    else:
        key_id, digest, media_id = ":key_id", ":digest", ":media_id"
        variants = "json_group_array(json_array(v.storage_key, v.size_bytes, v.mime_type))"
    return f"""
SELECT k.org_id, k.secret_sha256, {dialect.compile(db_now())},
       m.id, m.org_id, m.storage_key, m.size_bytes, m.mime_type, m.sha256, m.created_at, m.ttl_seconds,
       m.expires_at, m.state, m.held_at, m.org_held, m.deletion_reason, m.deleted_at, m.claimed_at,
       CASE WHEN m.has_variants THEN (SELECT {variants} FROM media_variants AS v WHERE v.item_id = m.id) END
FROM (SELECT {key_id} AS key_id, {digest} AS digest, {media_id} AS media_id) AS asked
LEFT JOIN api_keys AS k ON k.id = asked.key_id AND k.revoked_at IS NULL
LEFT JOIN media_items AS m ON m.id = asked.media_id AND m.org_id = k.org_id AND k.secret_sha256 = asked.digest
"""


class ItemRow(NamedTuple):
    """The item's columns as the statement read them, named as `MediaItem`'s (so `Item.from_row` takes it)."""

    id: str
    org_id: str
    storage_key: str
    size_bytes: int
    mime_type: str | None
    sha256: str | None
    created_at: datetime
    ttl_seconds: int | None
    expires_at: datetime
    state: str
    held_at: datetime | None
    org_held: bool
    deletion_reason: str | None
    deleted_at: datetime | None
    claimed_at: datetime | None


class KeyedRow(NamedTuple):
    """What the statement answered: the key (None when unknown or revoked), the database's time, and the item
    (None unless the key's secret matched and its org owns an item of that ID) with its variants as
    (storage key, size, MIME) in key order."""

    key_org: str | None
    key_digest: str | None
    now: datetime
    item: ItemRow | None
    variants: tuple[tuple[str, int, str], ...]


def keyed_row(values: tuple) -> KeyedRow:
    """The statement's row (a driver tuple) as a `KeyedRow`, timestamps aware UTC on both databases."""
    key_org, key_digest, now, *item, variants = values
    if item[0] is None:
        found = None
    else:
        (media_id, org_id, storage_key, size_bytes, mime_type, sha256, created_at, ttl_seconds, expires_at, state,
         held_at, org_held, deletion_reason, deleted_at, claimed_at) = item
        utc = _UTC.process_result_value
        found = ItemRow(media_id, org_id, storage_key, size_bytes, mime_type, sha256, utc(created_at, None), ttl_seconds,
                        utc(expires_at, None), state, utc(held_at, None), bool(org_held), deletion_reason,
                        utc(deleted_at, None), utc(claimed_at, None))
    if isinstance(variants, str):  # SQLite hands JSON back as text; psycopg parses it
        variants = json.loads(variants)
    return KeyedRow(key_org, key_digest, _UTC.process_result_value(now, None), found,
                    tuple(sorted(tuple(variant) for variant in variants or ())))
