"""The statements of holds by case that touch `media_items` (worker/catalog/holds.py decides when to run them).

What the claim reads stays two flat columns (DESIGN invariant 7): an item's `held_at` is non-NULL while a
`hold_items` row names it (every such row belongs to an open item or query placement: a release deletes its
rows), and `org_held` is set on an org's active rows while an open org placement names the org (see
`mirror_org_hold` in writes.py). These functions keep `held_at` in step with `hold_items` in the caller's
transaction; the caller serializes them (see Holds._serialize) and locks the org row where an org's
registrations could race them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, case, func, insert, literal, or_, select, union, update

from worker import models
from worker.db import db_clock, db_now, plus_seconds
from worker.dialect import Dialect
from worker.items.predicates import live, not_gone_by_expiry, org_live


def mime_matches(column, pattern: str | None):
    """`column` (a MIME type as registered) matches `pattern` (`type/subtype` or `type/*`, lower case, validated
    by the caller): case-insensitive, parameters (`; charset=...`) ignored. None matches everything."""
    if pattern is None:
        return literal(True)
    value = func.lower(func.trim(column))
    if pattern.endswith("/*"):
        return value.startswith(pattern[:-1], autoescape=True)
    return or_(value == pattern, value.startswith(pattern + ";", autoescape=True),
               value.startswith(pattern + " ", autoescape=True))


def query_matches(items, org_id: str, after: datetime, before: datetime, mime: str | None):
    """An active item of `org_id` created in [after, before) whose MIME type matches `mime`."""
    return and_(org_live(items, org_id), items.c.state == models.State.ACTIVE.value, items.c.created_at >= after,
                items.c.created_at < before, mime_matches(items.c.mime_type, mime))


def hold_by_query(session, dialect: Dialect, hold_id: int, org_id: str, after: datetime, before: datetime,
                  mime: str | None, reason: str) -> int:
    """Hold every active item of the org matching the query under placement `hold_id`: one set-based pass,
    in the caller's transaction. Returns how many items the placement holds.

    On PostgreSQL one statement: the UPDATE marks the rows (locking each; a row a sweep has locked is waited
    for and its state re-checked after, so a row claimed meanwhile is skipped, never held while deleting), and
    only the rows it marked become members. On SQLite (one writer at a time) the members are inserted first,
    then marked."""
    items, members = models.MediaItem.__table__, models.HoldItem.__table__
    # Never an item already gone by its expiry (expired and unheld: an expiry sweep may have deleted its blobs
    # already), judged per row once it is locked. Media registered later is judged at its registration instead
    # (`apply_future_holds`): its blob was just written.
    match = and_(query_matches(items, org_id, after, before, mime), not_gone_by_expiry(items, db_clock()))
    if dialect.postgresql:
        marked = (update(items).where(match)
                  .values(held_at=func.coalesce(items.c.held_at, db_clock()),
                          hold_reason=func.coalesce(items.c.hold_reason, reason))
                  .returning(items.c.id).cte("marked"))
        added = (insert(members).from_select(["hold_id", "item_id"], select(literal(hold_id), marked.c.id))
                 .returning(members.c.item_id).cte("added"))
        return session.scalar(select(func.count()).select_from(added)) or 0
    session.execute(insert(members).from_select(["hold_id", "item_id"], select(literal(hold_id), items.c.id).where(match)))
    return mark_members(session, [hold_id], reason)


def mark_members(session, hold_ids: Sequence[int], reason: str, item_ids: Sequence[str] | None = None) -> int:
    """Set `held_at` (keeping an earlier one) on the active members of `hold_ids` (only `item_ids` of them when
    given); returns how many members those placements have among them."""
    items, members = models.MediaItem.__table__, models.HoldItem.__table__
    chosen = select(members.c.item_id).where(members.c.hold_id.in_(list(hold_ids)))
    if item_ids is not None:
        chosen = chosen.where(members.c.item_id.in_(list(item_ids)))
    return session.execute(
        update(items).where(items.c.id.in_(chosen), items.c.state == models.State.ACTIVE.value)
        .values(held_at=func.coalesce(items.c.held_at, db_clock()), hold_reason=func.coalesce(items.c.hold_reason, reason))
    ).rowcount


def unhold_members(session, hold_ids: Sequence[int], item_ids: Sequence[str] | None = None) -> int:
    """Before the members of `hold_ids` (only `item_ids` of them when given) are deleted: clear `held_at` on
    those that no other placement holds (a member of any other `hold_items` row stays held). Returns how many
    items became unheld (an org hold may still keep some through `org_held`)."""
    items, members = models.MediaItem.__table__, models.HoldItem.__table__
    released = list(hold_ids)
    chosen = select(members.c.item_id).where(members.c.hold_id.in_(released))
    if item_ids is not None:
        chosen = chosen.where(members.c.item_id.in_(list(item_ids)))
    others = select(members.c.item_id).where(members.c.item_id == items.c.id, members.c.hold_id.not_in(released))
    return session.execute(
        update(items).where(items.c.id.in_(chosen), items.c.held_at.is_not(None), ~others.exists())
        .values(held_at=None, hold_reason=None)
    ).rowcount


def active_members(session, item_ids: Sequence[str]) -> list[tuple[str, str]]:
    """`(id, state)` of `item_ids`, locked for update (waiting for a claim that holds one): what an item placement
    checks before it holds them."""
    items = models.MediaItem.__table__
    return session.execute(select(items.c.id, items.c.state).where(items.c.id.in_(list(item_ids))).with_for_update()).all()


def apply_future_holds(session, dialect: Dialect, rows: list[dict]) -> None:
    """Hold newly inserted rows that an open `--include-future` query placement of their org matches, in the
    transaction that inserted them. The caller holds a share lock on each org row (registration's
    `_org_policies(lock=True)`), and a placement or release of a query hold takes it FOR UPDATE, so no
    placement commits between this read and the insert: a row registered while one is being placed is
    either seen by the placement's query (committed first) or held here (the placement committed first)."""
    if not rows:
        return
    holds = models.Hold.__table__
    orgs = sorted({row["org_id"] for row in rows})
    placements = session.execute(
        select(holds.c.id, holds.c.org_id, holds.c.created_after, holds.c.created_before, holds.c.mime_pattern,
               holds.c.reason)
        .where(holds.c.org_id.in_(orgs), holds.c.released_at.is_(None), holds.c.include_future.is_(True))
        .order_by(holds.c.id)
    ).all()
    if not placements:
        return
    items, members = models.MediaItem.__table__, models.HoldItem.__table__
    ids = [row["id"] for row in rows]
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        for hold in placements:
            match = and_(items.c.id.in_(chunk),
                         query_matches(items, hold.org_id, hold.created_after, hold.created_before, hold.mime_pattern))
            session.execute(insert(members).from_select(["hold_id", "item_id"], select(literal(hold.id), items.c.id).where(match)))
            mark_members(session, [hold.id], hold.reason, chunk)


# -- what holds hold now: `hold list`, the retention preview --------------------------------------------


def _held_by_case(holds, members, items, *, org_id: str | None, case_name: str | None):
    """`(case_name, item_id)` of every active item an open placement holds (through `hold_items` or its org)."""
    open_holds = holds.c.released_at.is_(None)
    via_members = (select(holds.c.case_name, members.c.item_id.label("item_id"))
                   .join(members, members.c.hold_id == holds.c.id).where(open_holds))
    # An org placement holds the org's active items that carry `org_held` (not those gone by their expiry before
    # it was placed: expired is final), read by the org index (its LIVE predicate spelled as the index is).
    via_org = (select(holds.c.case_name, items.c.id.label("item_id"))
               .join(items, and_(items.c.org_id == holds.c.org_id, live(), items.c.state == models.State.ACTIVE.value,
                                 items.c.org_held))
               .where(open_holds, holds.c.scope == "org"))
    if case_name is not None:
        via_members = via_members.where(holds.c.case_name == case_name)
        via_org = via_org.where(holds.c.case_name == case_name)
    if org_id is not None:
        via_members = via_members.join(items, items.c.id == members.c.item_id).where(org_live(items, org_id))
        via_org = via_org.where(holds.c.org_id == org_id)
    return union(via_members, via_org).subquery("held")


def held_counts_by_case(session, *, org_id: str | None = None, case_name: str | None = None) -> dict[str, int]:
    """How many active items each case holds now (distinct items, whichever of its placements holds them)."""
    held = _held_by_case(models.Hold.__table__, models.HoldItem.__table__, models.MediaItem.__table__,
                         org_id=org_id, case_name=case_name)
    return {name: int(count) for name, count in session.execute(
        select(held.c.case_name, func.count()).group_by(held.c.case_name))}


def held_due_by_case(session, org_id: str, seconds: int, governed=None) -> dict[str, int]:
    """Of the org's active items that a retention of `seconds` would make due, how many each case holds (an item
    held by two cases counts for each): what `org set --dry-run` reports as held, by case. `governed` as in
    `reads.retention_preview`: the rows the period applies to (those no retention rule covers)."""
    items = models.MediaItem.__table__
    held = _held_by_case(models.Hold.__table__, models.HoldItem.__table__, items, org_id=org_id, case_name=None)
    changes = items.c.ttl_seconds.is_(None) if governed is None else and_(items.c.ttl_seconds.is_(None), governed)
    new_expiry = case((changes, plus_seconds(items.c.created_at, seconds)), else_=items.c.expires_at)
    return {name: int(count) for name, count in session.execute(
        select(held.c.case_name, func.count()).join(items, items.c.id == held.c.item_id)
        .where(new_expiry <= db_now()).group_by(held.c.case_name))}


def held_without_case(session, org_id: str | None = None) -> int:
    """Active items carrying `held_at` that no `hold_items` row names: zero unless the catalog was changed behind
    the holds' back (verify-style consistency check for tests and `hold list`)."""
    items, members = models.MediaItem.__table__, models.HoldItem.__table__
    statement = select(func.count()).where(items.c.held_at.is_not(None),
                                           ~select(members.c.item_id).where(members.c.item_id == items.c.id).exists())
    if org_id is not None:
        statement = statement.where(items.c.org_id == org_id)
    return session.scalar(statement) or 0


