"""What a new org retention would do, before it is set: `org set ORG --retention D --dry-run`.

The count is the next sweep's own predicate evaluated with the new period instead of the stored
expiry: active, not held (item or org), and either a TTL item already expired (a TTL overrides the
org period, so the change does not move it) or a TTL-less item with `created_at + new period` at or
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
    retention: str
    new_retention: str
    org_held: bool
    due: int  # what the next sweep would delete of this org under the new period
    due_bytes: int
    newly_due: int  # of those, the ones the current period would still keep
    newly_due_bytes: int
    kept_longer: int  # TTL-less active items whose expiry moves later
    held: int  # would be due, but a hold keeps them
    ttl_items: int  # active items with a TTL: the period does not apply to them
    held_by_case: dict[str, int] = field(default_factory=dict)  # of `held`, how many each case holds (overlaps count for each)

    def to_dict(self) -> dict:
        return {"org": self.org, "dry_run": True, "retention": self.retention, "new_retention": self.new_retention,
                "org_held": self.org_held, "due": self.due, "due_bytes": self.due_bytes, "newly_due": self.newly_due,
                "newly_due_bytes": self.newly_due_bytes, "kept_longer": self.kept_longer, "held": self.held,
                "ttl_items": self.ttl_items, "held_by_case": dict(sorted(self.held_by_case.items()))}


def preview_retention(db: Database, org_id: str, retention: str | None) -> RetentionPreview:
    validate_id(org_id, "organization id")
    if retention is None:
        raise BadInput("--dry-run previews a retention change; give the new period with --retention.")
    seconds = int(parse_retention(retention).total_seconds())
    with db.transaction() as session:
        org = session.get(Organization, org_id)
        if org is None:
            raise NotFound(f"organization {org_id!r} does not exist; it has no media a new retention could affect.")
        row = items_sql.retention_preview(session, org_id, seconds)
        held_by_case = items_sql.held_due_by_case(session, org_id, seconds)
    due, due_bytes, newly_due, newly_due_bytes, kept_longer, all_due, ttl_items = (int(value) for value in row)
    org_held = org.held_at is not None
    held = all_due - due
    return RetentionPreview(org=org_id, retention=describe(timedelta(seconds=org.retention_seconds)),
                            new_retention=describe(timedelta(seconds=seconds)), org_held=org_held, due=due,
                            due_bytes=due_bytes, newly_due=newly_due, newly_due_bytes=newly_due_bytes,
                            kept_longer=kept_longer, held=held, ttl_items=ttl_items,
                            held_by_case=held_by_case)
