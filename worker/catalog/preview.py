"""What a new retention would do, before it is set: `org set ORG --retention D --dry-run` and
`org rule set|rm ORG --mime PATTERN … --dry-run` (worker/catalog/rules.py).

The count is the next sweep's own predicate evaluated with the new period instead of the stored
expiry of the items the change applies to: active, not held (item or org), and either an item the
change does not move already expired (a TTL overrides every period; an item another rule decides
keeps its expiry) or a TTL-less item the period applies to with `created_at + new period` at or
before the database's clock. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from worker import items as items_sql
from worker.db import Database
from config.errors import BadInput, NotFound
from worker.models import Organization
from worker.policy import describe, parse_retention
from worker.store.keys import validate_id


@dataclass(frozen=True)
class RetentionPreview:
    org: str
    retention: str  # the period the items the change applies to live now
    new_retention: str  # the period they would live
    org_held: bool
    due: int  # what the next sweep would delete of this org under the new period
    due_bytes: int
    newly_due: int  # of those, the ones the current period would still keep
    newly_due_bytes: int
    kept_longer: int  # TTL-less active items whose expiry moves later
    held: int  # would be due, but a hold keeps them
    ttl_items: int  # active items the period would apply to but for their TTL
    applies_to: int = 0  # active TTL-less items the period applies to (their expiry is rewritten)
    mime: str | None = None  # the rule's pattern; None for the org's own period
    held_by_case: dict[str, int] = field(default_factory=dict)  # of `held`, how many each case holds (overlaps count for each)

    def to_dict(self) -> dict:
        return {"org": self.org, "dry_run": True, "retention": self.retention, "new_retention": self.new_retention,
                "org_held": self.org_held, "due": self.due, "due_bytes": self.due_bytes, "newly_due": self.newly_due,
                "newly_due_bytes": self.newly_due_bytes, "kept_longer": self.kept_longer, "held": self.held,
                "ttl_items": self.ttl_items, "applies_to": self.applies_to, "mime": self.mime,
                "held_by_case": dict(sorted(self.held_by_case.items()))}


def preview_of(session, dialect, org: Organization, rules: dict[str, int], pattern: str | None, current: int,
               seconds: int) -> RetentionPreview:
    """The preview of giving the items `pattern` decides under `rules` (None: the org's period) `seconds`
    instead of `current`, read in the caller's transaction."""
    governed = items_sql.governed_by(dialect, rules, pattern) if rules else None
    row = items_sql.retention_preview(session, org.id, seconds, governed)
    due, due_bytes, newly_due, newly_due_bytes, kept_longer, all_due, ttl_items, applies_to = (int(value) for value in row)
    # Held items by case, for the org's own period (`org set --dry-run`): which case keeps what would be due.
    held_by_case = items_sql.held_due_by_case(session, org.id, seconds, governed) if pattern is None else {}
    return RetentionPreview(org=org.id, retention=describe(timedelta(seconds=current)),
                            new_retention=describe(timedelta(seconds=seconds)), org_held=org.held_at is not None,
                            due=due, due_bytes=due_bytes, newly_due=newly_due, newly_due_bytes=newly_due_bytes,
                            kept_longer=kept_longer, held=all_due - due, ttl_items=ttl_items, applies_to=applies_to,
                            mime=pattern, held_by_case=held_by_case)


def preview_retention(db: Database, org_id: str, retention: str | None) -> RetentionPreview:
    """`org set ORG --retention D --dry-run`: the org's period applies to the items no rule covers."""
    from worker.catalog.rules import rules_of

    validate_id(org_id, "organization id")
    if retention is None:
        raise BadInput("--dry-run previews a retention change; give the new period with --retention.")
    seconds = int(parse_retention(retention).total_seconds())
    with db.transaction() as session:
        org = session.get(Organization, org_id)
        if org is None:
            raise NotFound(f"organization {org_id!r} does not exist; it has no media a new retention could affect.")
        rules = rules_of(session, [org_id]).get(org_id, {})
        return preview_of(session, db.sql, org, rules, None, org.retention_seconds, seconds)
