"""Holds by case: put items, a whole org, or an org's items matching a query on hold for a case, or release a
case's holds. Held media is never deleted; an item is held while any case holds it.

Each placement is a `holds` row (who, when, why, scope); the items an item or query placement holds are its
`hold_items` rows. What the sweep's claim reads is resolved here, when holds change, never at claim time
(DESIGN invariant 7): `held_at` on items some `hold_items` row names, `org_held` on the active rows of an org
some open org placement names (and the org row's own `held_at`, which verify compares claim times with).

Concurrency, in one order so nothing deadlocks:
1. Every placement and release first locks the catalog's one identity row: holds change one at a time, so a
   release's "does another case still hold it?" can never miss a placement committing beside it.
2. Org and query placements, and releases of them, then lock the org row FOR UPDATE. Registrations read the
   org under a share lock and hold their new rows by the org's open `--include-future` placements in the
   same transaction (worker/items/holds.py `apply_future_holds`): a registration is ordered entirely before or
   after a placement, never between its query and its commit.
3. Then the item rows, locked by the statements that change them: a row a sweep has claimed is waited for and
   re-checked (a claimed or deleted item is never marked held), and from then on skipped by every claim.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy import delete, select, update

from config.errors import BadInput, Gone, NotFound
from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor, require_items, took_effect_at
from worker.catalog.registration import parse_created_at
from worker.catalog.results import HoldResult
from worker.db import Database
from worker.models import AuditEvent, CatalogIdentity, Hold, HoldItem, Organization, State
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")

# The case of `hold` and `release` without `--case`: what they held and released before cases existed.
DEFAULT_CASE = "default"
# `type/subtype` or `type/*`: RFC 6838's restricted names, lower case (patterns are matched case-insensitively).
_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MIME_PATTERN = re.compile(rf"{_NAME}/(\*|{_NAME})")


def case_name(value: str | None) -> str:
    """A case name: the ID alphabet and length (1-128 of A-Za-z0-9._-); None is the default case."""
    return DEFAULT_CASE if value is None else validate_id(value, "case name")


def mime_pattern(value: str | None) -> str | None:
    """A MIME pattern, `type/subtype` or `type/*`, lower-cased; parameters are not part of a pattern."""
    if value is None:
        return None
    pattern = value.strip().lower() if isinstance(value, str) else ""
    if not _MIME_PATTERN.fullmatch(pattern):
        raise BadInput(f"invalid --mime pattern {value!r}: use type/subtype or type/*, e.g. image/png or video/*.")
    return pattern


def _time(value: str | datetime | None, option: str) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return parse_created_at(value)
    except BadInput:
        raise BadInput(f"malformed {option} {value!r}: use ISO-8601, e.g. 2026-03-01T00:00:00Z.") from None


@dataclass(frozen=True)
class Query:
    """A query placement's match: an org's items created in [after, before) whose MIME type matches `mime`."""

    after: datetime
    before: datetime
    mime: str | None
    include_future: bool


@dataclass(frozen=True)
class Placement:
    """One placement of a case, as `hold list` shows it."""

    id: int
    case: str
    scope: str
    org: str | None
    created_after: datetime | None
    created_before: datetime | None
    mime: str | None
    include_future: bool
    reason: str
    by: str
    placed_at: datetime
    released_at: datetime | None
    released_by: str | None

    def to_dict(self) -> dict:
        return {"id": self.id, "scope": self.scope, "org": self.org,
                "created_after": self.created_after.isoformat() if self.created_after else None,
                "created_before": self.created_before.isoformat() if self.created_before else None,
                "mime": self.mime, "include_future": self.include_future, "reason": self.reason, "by": self.by,
                "placed_at": self.placed_at.isoformat(),
                "released_at": self.released_at.isoformat() if self.released_at else None,
                "released_by": self.released_by}


@dataclass(frozen=True)
class CaseView:
    """A case: its placements (open first) and how many active items it holds now."""

    case: str
    open: bool
    items_held: int
    placements: tuple[Placement, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"case": self.case, "open": self.open, "items_held": self.items_held,
                "placements": [placement.to_dict() for placement in self.placements]}


class Holds:
    def __init__(self, db: Database):
        self.db = db

    # -- the entry points -----------------------------------------------------------------------------

    def set_hold(self, *, held: bool, reason: str, ids: Sequence[str] = (), org: str | None = None,
                 actor: str | None = None, case: str | None = None, created_after: str | datetime | None = None,
                 created_before: str | datetime | None = None, mime: str | None = None,
                 include_future: bool = False, release_all: bool = False) -> HoldResult:
        """Place a hold for `case` (default: `default`) on items, an org, or an org's items matching a query
        (`created_after`/`created_before`, optional `mime`, `include_future`), or release the case's holds on
        items, on an org (its org and query placements there), or everywhere (`release_all`). Every input is
        validated before anything changes; recorded with who and why."""
        if not isinstance(reason, str) or not reason.strip():
            raise BadInput("a --reason is required: say why media is held or released.")
        validation.reason(reason)
        explicit_case = case is not None
        case = case_name(case)
        actor = validation.actor(actor or default_actor())
        ids = tuple(ids)
        for media_id in ids:
            validate_id(media_id)
        if org is not None:
            validate_id(org, "organization id")
        query = self._query(org, created_after, created_before, mime, include_future, ids)
        if not held and query is not None:
            raise BadInput("release takes media IDs, --org or neither (the whole case); a query is released with "
                           "its case (--case) or its org (--org).")
        if release_all and (ids or org is not None or held):
            raise BadInput("releasing a whole case takes --case alone, without media IDs or --org.")
        if not release_all and bool(ids) == (org is not None):
            raise BadInput("give media IDs or --org, not both and not neither.")
        if release_all and not explicit_case:
            raise BadInput("say which case to release with --case.")
        if held:
            return self._place(case, reason, actor, ids, org, query)
        return self._release(case, reason, actor, ids, org, explicit_case)

    @staticmethod
    def _query(org, created_after, created_before, mime, include_future, ids) -> Query | None:
        if created_after is None and created_before is None and mime is None and not include_future:
            return None
        if org is None or ids:
            raise BadInput("a hold by query names one --org and no media IDs.")
        after, before = _time(created_after, "--created-after"), _time(created_before, "--created-before")
        if after is None or before is None:
            raise BadInput("a hold by query needs both --created-after and --created-before (a half-open window).")
        if after >= before:
            raise BadInput(f"--created-after ({after.isoformat()}) must be before --created-before ({before.isoformat()}).")
        return Query(after, before, mime_pattern(mime), bool(include_future))

    def _serialize(self, session) -> None:
        """Holds change one at a time (the catalog identity row, locked FOR UPDATE; SQLite's writer lock does as much)."""
        session.execute(select(CatalogIdentity.id).with_for_update())

    def _org(self, session, org: str) -> Organization:
        target = session.get(Organization, org, with_for_update=True)
        if target is None:
            raise NotFound(f"organization {org!r} does not exist; nothing was changed.")
        return target

    # -- placing ----------------------------------------------------------------------------------------

    def _place(self, case: str, reason: str, actor: str, ids: tuple[str, ...], org: str | None,
               query: Query | None) -> HoldResult:
        changed: list[str] = []
        with self.db.transaction() as session:
            self._serialize(session)
            if org is not None:
                target = self._org(session, org)
                scope = "query" if query is not None else "org"
            else:
                scope = "item"
                found = require_items(session, ids)  # locked: a claim that took one first has committed
                gone = [media_id for media_id in ids if found[media_id].state != State.ACTIVE.value]
                if gone:
                    raise Gone(f"media id {gone[0]!r} is already being deleted or gone; nothing was changed.")
                # Expired is final: an unheld item past its expiry (the wall clock, read now the rows are locked) is
                # gone, and an expiry sweep may have deleted its blobs already; a hold does not bring it back.
                now = took_effect_at(session)
                expired = [media_id for media_id in ids if found[media_id].expires_at <= now
                           and found[media_id].held_at is None and not found[media_id].org_held]
                if expired:
                    raise Gone(f"media id {expired[0]!r} expired at {found[expired[0]].expires_at.isoformat()} and is "
                               "gone; nothing was changed.")
                changed = [media_id for media_id in dict.fromkeys(ids) if found[media_id].held_at is None]
            hold = Hold(case_name=case, scope=scope, org_id=org, reason=reason, placed_by=actor,
                        created_after=query.after if query else None, created_before=query.before if query else None,
                        mime_pattern=query.mime if query else None, include_future=bool(query and query.include_future))
            session.add(hold)
            session.flush()
            if scope == "item":
                session.execute(HoldItem.__table__.insert(), [{"hold_id": hold.id, "item_id": media_id}
                                                               for media_id in dict.fromkeys(ids)])
                count = items_sql.mark_members(session, [hold.id], reason)
            elif scope == "query":
                count = items_sql.hold_by_query(session, self.db.sql, hold.id, org, query.after, query.before,
                                                query.mime, reason)
            else:
                if target.held_at is None:
                    changed = [org]
                    items_sql.mirror_org_hold(session, org, True)
                count = 0
            # Stamped only now: the statements above may have waited for claims of these rows, which finished.
            stamp = took_effect_at(session)
            hold.placed_at = stamp
            if scope == "org" and target.held_at is None:
                target.held_at, target.hold_reason = stamp, reason
            details = {"case": case, "hold_id": hold.id, "scope": scope}
            if scope == "item":
                session.add_all([AuditEvent(at=stamp, action="hold", actor=actor, org_id=found[media_id].org_id,
                                            media_id=media_id, reason=reason, details=details)
                                 for media_id in dict.fromkeys(ids)])
            else:
                if query is not None:
                    details.update(created_after=query.after.isoformat(), created_before=query.before.isoformat(),
                                   mime=query.mime, include_future=query.include_future, items=count)
                session.add(AuditEvent(at=stamp, action=f"{scope}_hold", actor=actor, org_id=org, reason=reason,
                                       details=details))
        log.info("media.hold", case=case, scope=scope, hold_id=hold.id, org=org, ids=list(ids)[:20], items=count,
                 changed=len(changed), actor=actor, reason=reason)
        return HoldResult(action="hold", org=org, ids=tuple(dict.fromkeys(ids)), changed=tuple(changed), reason=reason,
                          actor=actor, case=case, scope=scope, holds=(hold.id,), items=count)

    # -- releasing --------------------------------------------------------------------------------------

    def _release(self, case: str, reason: str, actor: str, ids: tuple[str, ...], org: str | None,
                 explicit_case: bool) -> HoldResult:
        holds = Hold.__table__
        changed: list[str] = []
        with self.db.transaction() as session:
            self._serialize(session)
            if explicit_case and session.scalar(select(holds.c.id).where(holds.c.case_name == case,
                                                                          holds.c.released_at.is_(None)).limit(1)) is None:
                raise BadInput(f"case {case!r} holds nothing (no open hold of that case); nothing was changed.")
            if org is not None:
                self._org(session, org)
            elif not ids:  # the whole case: lock its orgs (in one order) against registrations' future holds
                orgs = sorted(session.scalars(select(holds.c.org_id).distinct().where(
                    holds.c.case_name == case, holds.c.released_at.is_(None), holds.c.org_id.is_not(None))))
                for name in orgs:
                    self._org(session, name)
            found = require_items(session, ids) if ids else {}
            chosen = select(holds.c.id, holds.c.scope, holds.c.org_id).where(holds.c.case_name == case,
                                                                             holds.c.released_at.is_(None))
            if ids:
                chosen = chosen.where(holds.c.scope == "item")
            elif org is not None:
                chosen = chosen.where(holds.c.org_id == org)
            placements = session.execute(chosen.order_by(holds.c.id)).all()
            with_members = [row.id for row in placements if row.scope != "org"]
            released_ids: list[int] = []
            unheld = 0
            if with_members:
                restrict = list(dict.fromkeys(ids)) if ids else None
                was_held = [media_id for media_id in ids if found[media_id].held_at is not None]
                unheld = items_sql.unhold_members(session, with_members, restrict)
                gone_members = delete(HoldItem.__table__).where(HoldItem.hold_id.in_(with_members))
                if restrict is not None:
                    gone_members = gone_members.where(HoldItem.item_id.in_(restrict))
                session.execute(gone_members)
                if ids:
                    session.flush()
                    for media_id in was_held:
                        session.refresh(found[media_id])
                    changed = [media_id for media_id in was_held if found[media_id].held_at is None]
                    # An item placement left holding nothing is released; one still holding others stays open.
                    left = set(session.scalars(select(HoldItem.hold_id).distinct().where(HoldItem.hold_id.in_(with_members))))
                    released_ids += [hold_id for hold_id in with_members if hold_id not in left]
                else:
                    released_ids += with_members
            org_placements = [row for row in placements if row.scope == "org"]
            released_ids += [row.id for row in org_placements]
            stamp = took_effect_at(session)
            if released_ids:
                session.execute(update(holds).where(holds.c.id.in_(released_ids))
                                .values(released_at=stamp, released_by=actor, release_reason=reason))
            for name in sorted({row.org_id for row in org_placements}):
                still = session.scalar(select(holds.c.id).where(holds.c.org_id == name, holds.c.scope == "org",
                                                                holds.c.released_at.is_(None)).limit(1))
                if still is None:
                    target = session.get(Organization, name)
                    items_sql.mirror_org_hold(session, name, False)
                    target.held_at, target.hold_reason = None, None
                    changed.append(name)
            # Audited with the case: one event per named item (as before cases), one per org or query placement.
            if ids:
                session.add_all([AuditEvent(at=stamp, action="release", actor=actor, org_id=found[media_id].org_id,
                                            media_id=media_id, reason=reason,
                                            details={"case": case, "scope": "item", "holds": released_ids})
                                 for media_id in dict.fromkeys(ids)])
            for row in placements:
                if row.scope != "item" and row.id in released_ids:
                    session.add(AuditEvent(at=stamp, action=f"{row.scope}_release", actor=actor, org_id=row.org_id,
                                           reason=reason, details={"case": case, "hold_id": row.id, "scope": row.scope}))
            if not ids and not org:
                session.add(AuditEvent(at=stamp, action="case_release", actor=actor, reason=reason,
                                       details={"case": case, "holds": released_ids}))
        log.info("media.release", case=case, org=org, ids=list(ids)[:20], holds=released_ids, changed=len(changed),
                 actor=actor, reason=reason)
        return HoldResult(action="release", org=org, ids=tuple(dict.fromkeys(ids)), changed=tuple(changed), reason=reason,
                          actor=actor, case=case, scope="item" if ids else ("org" if org else "case"),
                          holds=tuple(released_ids), items=unheld)

    # -- listing ----------------------------------------------------------------------------------------

    def list_cases(self, *, org: str | None = None, case: str | None = None, include_released: bool = True) -> list[CaseView]:
        """Every case (or `case`; only placements on `org` with `org`), its placements and how many active items
        it holds now."""
        if org is not None:
            validate_id(org, "organization id")
        if case is not None:
            validate_id(case, "case name")
        holds = Hold.__table__
        with self.db.transaction() as session:
            statement = select(holds).order_by(holds.c.case_name, holds.c.id)
            if case is not None:
                statement = statement.where(holds.c.case_name == case)
            if org is not None:
                statement = statement.where(holds.c.org_id == org)
            rows = session.execute(statement).all()
            # With --org: the org's org and query placements (an item placement may span orgs; its items of
            # this org are in the case's count all the same).
            counts = items_sql.held_counts_by_case(session, org_id=org, case_name=case)
        if case is not None and not rows:
            raise NotFound(f"case {case!r} has no hold" + (f" on organization {org!r}." if org else "."))
        by_case: dict[str, list[Placement]] = {}
        for row in rows:
            if not include_released and row.released_at is not None:
                continue
            by_case.setdefault(row.case_name, []).append(Placement(
                id=row.id, case=row.case_name, scope=row.scope, org=row.org_id, created_after=row.created_after,
                created_before=row.created_before, mime=row.mime_pattern, include_future=row.include_future,
                reason=row.reason, by=row.placed_by, placed_at=row.placed_at, released_at=row.released_at,
                released_by=row.released_by))
        return [CaseView(case=name, open=any(p.released_at is None for p in placements),
                         items_held=counts.get(name, 0), placements=tuple(placements))
                for name, placements in by_case.items()]
