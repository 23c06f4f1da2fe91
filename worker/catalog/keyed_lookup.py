"""The HTTP lookup as the catalog answers it: a presented API key and a media ID, judged in one statement.

`KeyedLookup.answer` asks the database once (worker/items/keyed.py: the key, the item that key may see, its
variants and the database's clock, in autocommit) and judges the row exactly as every other lookup path does
(`worker.catalog.lookup.judged`). Nothing about a key is remembered between requests: a revoked key is
refused from the next request on, by every replica, because every request reads the key's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from config.errors import BadInput
from worker import items as items_sql
from worker.catalog.apikeys import parse_token, secret_matches
from worker.catalog.lookup import Lookup, judged
from worker.catalog.results import Item, Tombstone, Variant
from worker.db import Database
from worker.db_async import Statement, statement_on
from worker.store.keys import validate_id


@dataclass(frozen=True)
class KeyedAnswer:
    """What a lookup with a key answers: the key's org (None: no valid key, 401) and, for a valid key, the
    item while active, its tombstone once gone, or None for an ID that org never registered; or why the ID
    is malformed (400)."""

    org: str | None
    found: Item | Tombstone | None = None
    malformed: BadInput | None = None


REFUSED = KeyedAnswer(org=None)


class KeyedLookup:
    def __init__(self, lookup: Lookup, statement: Statement):
        self.lookup = lookup
        self.statement = statement

    @classmethod
    def on(cls, db: Database, lookup: Lookup) -> "KeyedLookup":
        """The lookup on `db`'s fastest path (worker/db_async.py); `lookup` signs URLs on its store."""
        sql = items_sql.keyed_lookup_sql(db.sql)
        return cls(lookup, statement_on(db, sql, prepare_params={"key_id": "", "digest": "", "media_id": ""}))

    async def answer(self, token: str | None, media_id: str) -> KeyedAnswer:
        """The answer for a request presenting `token` for `media_id`, in at most one round trip: none for a
        token that cannot be a key (REFUSED). A malformed ID is reported (`malformed`) only with a valid key, so
        a caller without one learns nothing, not even that an ID is malformed. Raises DatabaseUnavailable."""
        presented = parse_token(token)
        if presented is None:
            return REFUSED
        key_id, digest = presented
        try:
            validate_id(media_id)
            malformed = None
        except BadInput as exc:
            malformed = exc
        # A malformed ID is never sent: the empty ID matches no item, and the key is still checked.
        values = await self.statement.fetchone({"key_id": key_id, "digest": digest,
                                                "media_id": "" if malformed else media_id})
        row = items_sql.keyed_row(values)
        if not secret_matches(row.key_digest, digest):
            return REFUSED
        if malformed is not None:
            return KeyedAnswer(org=row.key_org, malformed=malformed)
        if row.item is None:
            return KeyedAnswer(org=row.key_org)
        return KeyedAnswer(org=row.key_org, found=judged(row.item, row.now, tuple(Variant(*v) for v in row.variants)))

    @property
    def can_presign(self) -> bool:
        return self.lookup.store.can_presign

    def sign(self, item: Item) -> tuple[str, datetime] | None:
        return self.lookup.sign(item)

    def sign_variants(self, item: Item) -> tuple[Variant, ...]:
        return self.lookup.sign_variants(item)

    async def close(self) -> None:
        await self.statement.close()
