"""The audit trail, read: who deleted, held, released, purged, imported or changed what, when and why.

Written where each thing happens, in the same transaction as the change it records (sweep
deletions per finalized batch, counts by org and reason; purges; holds and releases; retention
changes; reconciles; imports; API keys). Read here, newest first, a page at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from worker.db import Database, db_now
from config.durations import parse_duration
from config.errors import BadInput
from worker.models import AuditEvent
from worker.store.keys import validate_id

ACTIONS = ("deleted", "purge", "hold", "release", "org_hold", "org_release", "org_create", "org_set", "rule_set", "rule_rm", "reconcile",
           "reconcile_missing_blob", "import", "adopt", "apikey_create", "apikey_revoke", "compact", "variant_add")
# A page a person can read on a screen; scripts page on with --before.
DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    action: str
    actor: str
    org: str | None
    media_id: str | None
    reason: str | None
    details: dict | None

    def to_dict(self) -> dict:
        return {"id": self.id, "at": self.at.isoformat(), "action": self.action, "actor": self.actor, "org": self.org,
                "media_id": self.media_id, "reason": self.reason, "details": self.details}


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    more: bool  # older entries match too: ask again with before = entries[-1].id

    @property
    def next_before(self) -> int | None:
        return self.entries[-1].id if self.more and self.entries else None


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO-8601 time, or a duration meaning that long before now (`7d`, `PT1H`)."""
    try:
        return now - parse_duration(text)
    except BadInput:
        pass
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"malformed --since {text!r}: give an ISO-8601 time (2026-01-31T12:00:00Z) or a duration (7d).") from None
    return value.replace(tzinfo=now.tzinfo) if value.tzinfo is None else value


class AuditTrail:
    def __init__(self, db: Database):
        self.db = db

    def read(self, *, org: str | None = None, since: str | None = None, action: str | None = None,
             limit: int = DEFAULT_LIMIT, before: int | None = None) -> AuditPage:
        """Entries newest first (by id, which grows with time), at most `limit`, older than `before`."""
        if org is not None:
            validate_id(org, "organization id")
        if action is not None and action not in ACTIONS:
            raise BadInput(f"unknown --action {action!r}: use one of {', '.join(ACTIONS)}.")
        if not 1 <= limit <= 10_000:
            raise BadInput("--limit must be between 1 and 10000.")
        events = AuditEvent.__table__
        query = select(events).order_by(events.c.id.desc()).limit(limit + 1)
        with self.db.transaction() as session:
            if since is not None:
                query = query.where(events.c.at >= parse_since(since, session.scalar(select(db_now()))))
            if org is not None:
                query = query.where(events.c.org_id == org)
            if action is not None:
                query = query.where(events.c.action == action)
            if before is not None:
                query = query.where(events.c.id < before)
            rows = session.execute(query).all()
        entries = [AuditEntry(id=row.id, at=row.at, action=row.action, actor=row.actor, org=row.org_id,
                              media_id=row.media_id, reason=row.reason, details=row.details) for row in rows[:limit]]
        return AuditPage(entries=entries, more=len(rows) > limit)
