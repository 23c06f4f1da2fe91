"""The reads of `media_items`: each takes a session (the caller's transaction) and plain values, and
returns rows, counts or sums. What to make of them stays with the caller."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, case, false, func, or_, select, true, union_all

from worker import models
from worker.db import db_now, plus_seconds
from worker.dialect import Dialect
from worker.items.predicates import claimable, compactable, deleting, due, held, held_expired, not_gone_by_expiry, org_live, tombstone

# -- the sweep: what is due, what it leaves alone ------------------------------------------------------


def next_due(session) -> tuple[datetime, datetime | None, datetime | None]:
    """The database's time, the earliest expiry of a claimable item and the earliest lease of a claimed
    one (None where there is none): two reads of the first entry of the claims' own partial indexes."""
    items = models.MediaItem.__table__
    next_expiry = select(func.min(items.c.expires_at)).where(claimable()).scalar_subquery()
    next_lease = select(func.min(items.c.lease_until)).where(deleting()).scalar_subquery()
    now, expiry, lease = session.execute(select(db_now(), next_expiry, next_lease)).one()
    return now, expiry, lease


def held_expired_count(session) -> int:
    """Expired active items a sweep leaves alone because they or their org are on hold."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).where(held_expired(items, db_now()))) or 0


def due_preview(session, shown: int, limit: int | None = None) -> tuple[int, int, list]:
    """What a sweep would claim now, without claiming it (expired claimable items and claims whose lease
    ran out): how many, their bytes, and the first `shown` of them by expiry (`id`, `org_id`,
    `storage_key`, `size_bytes`, `expires_at`, `ttl_seconds`). With `limit`, the count and bytes are those
    of the first `limit` by expiry, what a sweep limited so claims; summed by the database, never loaded."""
    items = models.MediaItem.__table__
    now_due = or_(
        due(items, db_now()),
        and_(items.c.state == models.State.DELETING.value, items.c.lease_until <= db_now()),
    )
    counted = select(items.c.size_bytes).where(now_due)
    if limit is not None:
        counted = counted.order_by(items.c.expires_at).limit(limit)
    counted = counted.subquery()
    total, total_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(counted.c.size_bytes), 0)).select_from(counted)
    ).one()
    rows = session.execute(
        select(items.c.id, items.c.org_id, items.c.storage_key, items.c.size_bytes, items.c.expires_at, items.c.ttl_seconds)
        .where(now_due)
        .order_by(items.c.expires_at)
        .limit(shown)
    ).all()
    return total, total_bytes, rows


# -- fleet status: the backlog, what is stuck, how late deletions went ---------------------------------
# Where a partial index serves, its predicate as the index spells it (not `state = :param`), so even a
# generic plan (a long-lived exporter prepares these) reads the index.


def due_count(session) -> int:
    """Expired, unheld, active items: what a sweep would claim now (index range scan on expiry)."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).where(due(items, db_now()))) or 0


def due_totals(session) -> tuple[int, int]:
    """How many items a sweep would claim now, and their bytes."""
    items = models.MediaItem.__table__
    return tuple(session.execute(
        select(func.count(), func.coalesce(func.sum(items.c.size_bytes), 0)).where(due(items, db_now()))
    ).one())


def deleting_count(session) -> int:
    """Items claimed and not finalized yet."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).select_from(items).where(deleting())) or 0


def oldest_overdue(session):
    """The item due the longest (`id`, `expires_at`): due and unclaimed, or claimed and not finished;
    None when there is none."""
    items = models.MediaItem.__table__
    # The oldest of the two index heads: an OR of both predicates would read neither index.
    heads = [session.execute(select(items.c.id, items.c.expires_at).where(where).order_by(items.c.expires_at).limit(1)).first()
             for where in (due(items, db_now()), deleting())]
    return min((head for head in heads if head is not None), key=lambda head: head.expires_at, default=None)


def stuck_claims(session, listed: int) -> tuple[int, list]:
    """Claims whose delete failed at least once, or whose lease ran out with nobody taking them over:
    how many, and the first `listed` (`id`, `attempts`, `last_error`, `lease_until`, `claimed_at`), most
    attempts first. A delete refused by Object Lock is not stuck while it waits for its lock's date
    (`locked_deletions` reports those); once that date passes and no sweep has taken it, it is."""
    items = models.MediaItem.__table__
    stuck = deleting() & or_(and_(items.c.attempts > 0, items.c.lock_reason.is_(None)), items.c.lease_until < db_now())
    count = session.scalar(select(func.count()).select_from(items).where(stuck)) or 0
    rows = session.execute(
        select(items.c.id, items.c.attempts, items.c.last_error, items.c.lease_until, items.c.claimed_at)
        .where(stuck)
        .order_by(items.c.attempts.desc(), items.c.claimed_at)
        .limit(listed)
    ).all()
    return count, rows


def locked_deletions(session, listed: int) -> tuple[dict[str, int], object, list]:
    """Claimed items whose delete the store refused because the version is locked (Object Lock): a count per
    reason ('retention', 'legal_hold'), the earliest retain-until date, and the first `listed` (`id`,
    `storage_key`, `lock_reason`, `locked_until`), soonest first."""
    items = models.MediaItem.__table__
    locked = deleting() & items.c.lock_reason.is_not(None)
    counts = {reason: count for reason, count in session.execute(
        select(items.c.lock_reason, func.count()).where(locked).group_by(items.c.lock_reason))}
    earliest = session.scalar(select(func.min(items.c.locked_until)).where(locked))
    rows = session.execute(
        select(items.c.id, items.c.storage_key, items.c.lock_reason, items.c.locked_until).where(locked)
        .order_by(items.c.locked_until.is_(None), items.c.locked_until, items.c.id).limit(listed)
    ).all()
    return counts, earliest, rows


def missing_blob_counts(session) -> tuple[int, int]:
    """Active items whose blob reconcile found missing, and how many of them are held (read by the
    partial index on missing_since)."""
    items = models.MediaItem.__table__
    missing = items.c.missing_since.is_not(None) & (items.c.state == models.State.ACTIVE.value)
    count = session.scalar(select(func.count()).where(missing)) or 0
    held_count = session.scalar(select(func.count()).where(missing, held())) or 0
    return count, held_count


def recent_deletions(session, window_seconds: int, reasons, limit: int) -> list:
    """`expires_at` and `deleted_at` of the latest tombstones deleted for `reasons` within the last
    `window_seconds` (database clock), at most `limit`, newest first: read by the tombstones'
    deletion-time index."""
    items = models.MediaItem.__table__
    return session.execute(
        select(items.c.expires_at, items.c.deleted_at)
        .where(tombstone(), items.c.deleted_at >= db_now(-window_seconds), items.c.deletion_reason.in_(reasons))
        .order_by(items.c.deleted_at.desc())
        .limit(limit)
    ).all()


# -- registration, manifest import, adopt: what is taken already ---------------------------------------


def first_taken(session, dialect: Dialect, column: str, values: list[str]) -> str | None:
    """One of `values` already in `column` (`id` or `storage_key`) of any row, tombstones included, or None.
    As one array parameter on PostgreSQL: a list of placeholders, prepared and planned generically
    after a few runs, made the planner pick a scan of the whole table."""
    if not values:
        return None
    found = models.MediaItem.__table__.c[column]
    taken = session.execute(select(found).where(dialect.id_in(found, values)).limit(1)).scalar()
    if taken is None and column == "storage_key":
        # Keys are unique across items and their variants: a variant's key is taken too.
        variant_key = models.MediaVariant.__table__.c.storage_key
        taken = session.execute(select(variant_key).where(dialect.id_in(variant_key, values)).limit(1)).scalar()
    return taken


def existing(session, dialect: Dialect, column: str, values: list[str], *wanted: str) -> list:
    """The rows whose `column` is one of `values`: the `wanted` columns (by name), else every column."""
    if not values:
        return []
    items = models.MediaItem.__table__
    return session.execute(select(*((items.c[name] for name in wanted) if wanted else (items,)))
                           .where(dialect.id_in(items.c[column], values))).all()


def known_keys(session, keys: list[str]) -> set[str]:
    """Those of `keys` that a row (any state) already has, as an item's key or a variant's."""
    items, variants = models.MediaItem.__table__, models.MediaVariant.__table__
    return (set(session.scalars(select(items.c.storage_key).where(items.c.storage_key.in_(keys))))
            | set(session.scalars(select(variants.c.storage_key).where(variants.c.storage_key.in_(keys)))))


# -- variants: the derived blobs an item owns ---------------------------------------------------------


def variants_of(session, dialect: Dialect, ids: list[str]) -> dict[str, list]:
    """The variants of the items `ids` (item ID -> rows of `storage_key`, `size_bytes`, `mime_type`,
    `blob_version` and the item's `org_id`), by key."""
    if not ids:
        return {}
    variants, items = models.MediaVariant.__table__, models.MediaItem.__table__
    found: dict[str, list] = {}
    for row in session.execute(
        select(variants.c.item_id, variants.c.storage_key, variants.c.size_bytes, variants.c.mime_type,
               variants.c.blob_version, items.c.org_id)
        .join_from(variants, items, items.c.id == variants.c.item_id)
        .where(dialect.id_in(variants.c.item_id, ids)).order_by(variants.c.item_id, variants.c.storage_key)
    ):
        found.setdefault(row.item_id, []).append(row)
    return found


def locked_item(session, media_id: str):
    """The item `media_id` (a `MediaItem`, any state), locked for update until the transaction ends; None if
    never registered. Adding a variant holds it so a claim cannot slip between its check and its insert."""
    MediaItem = models.MediaItem
    return session.execute(select(MediaItem, db_now()).where(MediaItem.id == media_id).with_for_update()).first()


# -- one item, a list of items -------------------------------------------------------------------------


def by_id_and_now(session, media_id: str) -> tuple | None:
    """The item (a `MediaItem`, any state) and the database's time, read by one statement so that a lookup
    judges the expiry by the clock of the moment it read the row; None for an ID never registered."""
    MediaItem = models.MediaItem
    found = session.execute(select(MediaItem, db_now()).where(MediaItem.id == media_id)).first()
    return tuple(found) if found is not None else None


def locked_by_ids(session, ids: list[str]) -> list:
    """The items of `ids` that exist (`MediaItem`s), locked for update until the transaction ends."""
    MediaItem = models.MediaItem
    return list(session.scalars(select(MediaItem).where(MediaItem.id.in_(ids)).with_for_update()))


def purge_candidates(session, *, org_id: str | None = None, ids: list[str] | None = None) -> list:
    """The live items of an org, or the items of `ids` (any state), as a purge judges them: `id`, `org_id`,
    `state`, `held_at`, `org_held`, `size_bytes`. An org's tombstones are not read: a purge has nothing to do
    with them, and they have no index by org (reading them would cost the org's whole deletion history)."""
    items = models.MediaItem.__table__
    scope = org_live(items, org_id) if org_id is not None else items.c.id.in_(ids)
    return session.execute(
        select(items.c.id, items.c.org_id, items.c.state, items.c.held_at, items.c.org_held, items.c.size_bytes).where(scope)
    ).all()


# -- one org -------------------------------------------------------------------------------------------


def live_counts_by_state(session, org_id: str) -> dict[str, int]:
    """How many of the org's live items (not tombstones) are in each state (states without items left out),
    read by the org index. Tombstones are not counted: they are not in that index, and counting them would
    read every row the org ever had."""
    items = models.MediaItem.__table__
    return dict(session.execute(
        select(items.c.state, func.count()).where(org_live(items, org_id)).group_by(items.c.state)
    ).all())


def active_bytes(session, org_id: str) -> int:
    """Bytes of the org's active items."""
    items = models.MediaItem.__table__
    return session.scalar(
        select(func.coalesce(func.sum(items.c.size_bytes), 0)).where(
            org_live(items, org_id), items.c.state == models.State.ACTIVE.value
        )
    )


def governed_by(dialect, rules, pattern: str | None):
    """The rows whose retention `pattern` decides under the org's `rules` (pattern -> seconds, the pattern
    among them): for `type/subtype` the rows of that essence; for `type/*` the rows of that type no exact rule
    covers; for None the rows no rule covers (the org's period). The SQL twin of
    `worker.policy.governing_pattern`, which a test holds it to; TTLs and states are the caller's filter."""
    items = models.MediaItem.__table__
    essence = dialect.mime_essence(items.c.mime_type)
    exact = sorted(rule for rule in rules if not rule.endswith("/*"))
    wild = sorted(rule[:-1] for rule in rules if rule.endswith("/*"))  # "image/*" -> "image/"

    def of_type(prefix: str):
        return func.substr(essence, 1, len(prefix)) == prefix

    if pattern is None:
        conditions = [~or_(*(of_type(prefix) for prefix in wild))] if wild else []
        if exact:
            conditions.append(essence.not_in(exact))
        return and_(true(), *conditions)
    if not pattern.endswith("/*"):
        return essence == pattern
    prefix = pattern[:-1]
    same_type = [rule for rule in exact if rule.startswith(prefix)]
    return and_(of_type(prefix), essence.not_in(same_type)) if same_type else of_type(prefix)


def retention_preview(session, org_id: str, seconds: int, governed=None) -> tuple[int, ...]:
    """What a retention of `seconds` would make of the org's active items, by the next sweep's own predicate
    with the new period in place of the stored expiry for the TTL-less items it applies to (those `governed`
    selects when given: the rows one retention rule, or the org's period, decides): how many of the org's
    items would be due and their bytes, how many of those the current expiry still keeps and their bytes, how
    many would be kept longer, how many would be due held or not, how many the period would apply to but for
    their TTL, and how many it applies to."""
    items = models.MediaItem.__table__
    now = db_now()
    ttl_less = items.c.ttl_seconds.is_(None)
    changes = ttl_less if governed is None else and_(ttl_less, governed)
    # What the rewrite itself leaves alone: an item already gone by its expiry keeps it (`rewrite_expiry`).
    changes = and_(changes, not_gone_by_expiry(items, now))
    new_expiry = case((changes, plus_seconds(items.c.created_at, seconds)), else_=items.c.expires_at)
    due_new = new_expiry <= now
    due_old = items.c.expires_at <= now
    # The sweep's own predicate: an org hold is mirrored onto its items (`org_held`).
    eligible = claimable()

    def count(condition):
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    def size(condition):
        return func.coalesce(func.sum(case((condition, items.c.size_bytes), else_=0)), 0)

    return tuple(session.execute(
        select(
            count(and_(eligible, due_new)), size(and_(eligible, due_new)),
            count(and_(eligible, due_new, ~due_old)), size(and_(eligible, due_new, ~due_old)),
            count(and_(changes, new_expiry > items.c.expires_at)),
            count(due_new),
            count(~ttl_less if governed is None else and_(~ttl_less, governed)),
            count(changes),
        ).where(org_live(items, org_id), items.c.state == models.State.ACTIVE.value)
    ).one())


# -- reconcile and verify: the catalog beside the store's listing --------------------------------------


def has_items(session) -> bool:
    """Whether the catalog holds any item row at all (any state): an empty catalog facing a store full of
    blobs is what a wrong database URL looks like."""
    items = models.MediaItem.__table__
    return session.execute(select(items.c.id).limit(1)).first() is not None


def live_keys(session, limit: int) -> list[str]:
    """Storage keys of up to `limit` items that still have a blob (claimable, held or being deleted), each kind
    read from the head of its own partial index: a handful of index entries however large the catalog."""
    items = models.MediaItem.__table__
    keys: list[str] = []
    for where, order in ((claimable(), items.c.expires_at), (held(), items.c.expires_at), (deleting(), items.c.lease_until)):
        if len(keys) < limit:
            keys += session.scalars(select(items.c.storage_key).where(where).order_by(order).limit(limit - len(keys)))
    return keys


def key_owners(session, keys: list[str]) -> list:
    """The rows (any state) that `keys` belong to: `storage_key`, `state`, `deletion_reason`, `expires_at`.
    A variant's key belongs to its item: it comes with the item's state, reason and expiry, so it is live
    while the item is and a leak of its tombstone after."""
    items, variants = models.MediaItem.__table__, models.MediaVariant.__table__
    own = (select(items.c.storage_key, items.c.state, items.c.deletion_reason, items.c.expires_at)
           .where(items.c.storage_key.in_(keys)))
    derived = (select(variants.c.storage_key, items.c.state, items.c.deletion_reason, items.c.expires_at)
               .join_from(variants, items, items.c.id == variants.c.item_id)
               .where(variants.c.storage_key.in_(keys)))
    return session.execute(union_all(own, derived)).all()


def active_after(session, after: str, limit: int) -> list:
    """The next `limit` active items by ID after `after` (`id`, `storage_key`, `held_at`, `org_held`,
    `expires_at`, `missing_since`): reconcile's walk of the catalog, a page at a time."""
    items = models.MediaItem.__table__
    return session.execute(
        select(items.c.id, items.c.storage_key, items.c.held_at, items.c.org_held, items.c.expires_at,
               items.c.missing_since)
        .where(items.c.state == models.State.ACTIVE.value, items.c.id > after)
        .order_by(items.c.id)
        .limit(limit)
    ).all()


def _with_org(variant: bool = False):
    """Every row (any state) as verify judges it: the item's columns and its org's retention, hold and
    last change. With `variant`, one row per variant instead: its own key and size, its item's everything
    else, and `variant` true (`storage_key` is then the variant's key, `item_key` the item's)."""
    MediaItem, Organization, MediaVariant = models.MediaItem, models.Organization, models.MediaVariant
    key, size = (MediaVariant.storage_key, MediaVariant.size_bytes) if variant else (MediaItem.storage_key, MediaItem.size_bytes)
    statement = select(
        MediaItem.id, MediaItem.org_id, key.label("storage_key"), size.label("size_bytes"), MediaItem.state,
        MediaItem.deletion_reason, MediaItem.created_at, MediaItem.ttl_seconds, MediaItem.expires_at, MediaItem.mime_type,
        MediaItem.held_at, MediaItem.org_held, MediaItem.claimed_at, MediaItem.deleted_at, MediaItem.lease_until,
        MediaItem.attempts, MediaItem.last_error, MediaItem.lock_reason, MediaItem.locked_until,
        Organization.retention_seconds.label("org_retention_seconds"), Organization.held_at.label("org_held_at"),
        Organization.updated_at.label("org_updated_at"),
        (true() if variant else false()).label("variant"), MediaItem.storage_key.label("item_key"),
    )
    if variant:
        statement = statement.join_from(MediaVariant, MediaItem, MediaItem.id == MediaVariant.item_id)
    return statement.join(Organization, Organization.id == MediaItem.org_id)


def rows_by_key_order(session, after: str | None, limit: int) -> list:
    """The next `limit` rows (any state, with their org's policy) in storage-key order after `after`
    (from the first when None): verify's stream of the catalog, merged with the store's listing. Items and
    variants in one stream (both key columns are unique and in byte order), each side read by its own key
    index up to `limit`."""
    sides = []
    for variant, key in ((False, models.MediaItem.storage_key), (True, models.MediaVariant.storage_key)):
        statement = _with_org(variant)
        if after is not None:
            statement = statement.where(key > after)
        sides.append(statement.order_by(key).limit(limit).subquery())
    merged = union_all(*(select(side) for side in sides)).subquery()
    return session.execute(select(merged).order_by(merged.c.storage_key).limit(limit)).all()


def rows_by_keys(session, keys: list[str]) -> list:
    """The rows (any state, with their org's policy) of `keys`, items' and variants': verify's second look
    at a disagreement."""
    return session.execute(union_all(_with_org().where(models.MediaItem.storage_key.in_(keys)),
                                     _with_org(True).where(models.MediaVariant.storage_key.in_(keys)))).all()


# -- tombstone compaction and the volume ---------------------------------------------------------------


def old_tombstone_count(session, older_than_seconds: int) -> int:
    """How many tombstones compaction would remove."""
    items = models.MediaItem.__table__
    return session.scalar(select(func.count()).select_from(items)
                          .where(compactable(items, db_now(-older_than_seconds), db_now()))) or 0


def live_bytes(session) -> int:
    """Bytes of media that still has a blob: active items and items being deleted."""
    items = models.MediaItem.__table__
    return int(session.scalar(
        select(func.coalesce(func.sum(items.c.size_bytes), 0))
        .where(items.c.state.in_([models.State.ACTIVE.value, models.State.DELETING.value]))
    ))
