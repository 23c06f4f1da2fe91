"""Purge: delete media now regardless of expiry, through the sweep's pipeline; held media never."""

from __future__ import annotations

from collections.abc import Sequence

from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor, require_items
from worker.catalog.results import PurgeResult
from worker.db import Database
from config.errors import BadInput, NotFound
from worker.models import AuditEvent, Organization, State
from worker.store.keys import validate_id
from worker.sweep import Sweeper

# How many items a dry run names; the counts cover all of them.
PURGE_PREVIEW_LISTING = 1000


class Purge:
    def __init__(self, db: Database, sweeper: Sweeper):
        self.db = db
        self.sweeper = sweeper

    def purge(self, *, ids: Sequence[str] = (), org: str | None = None, dry_run: bool = False,
              actor: str | None = None, reason: str | None = None) -> PurgeResult:
        """Delete now regardless of expiry; held media is never purged."""
        if bool(ids) == (org is not None):
            raise BadInput("give media IDs or --org, not both and not neither.")
        actor = validation.actor(actor or default_actor())
        if reason is not None:
            validation.reason(reason)
        with self.db.transaction() as session:
            if org is not None:
                validate_id(org, "organization id")
                target = session.get(Organization, org)
                if target is None:
                    raise NotFound(f"organization {org!r} does not exist; nothing was purged.")
                if target.held_at is not None:
                    raise BadInput(f"organization {org!r} is on hold ({target.hold_reason}); release it before purging.")
                rows = items_sql.purge_candidates(session, org_id=org)
            else:
                found = require_items(session, ids)
                rows = items_sql.purge_candidates(session, ids=list(found))
        eligible = [r for r in rows if r.state == State.ACTIVE.value and r.held_at is None and not r.org_held]
        named = tuple(dict.fromkeys(ids))
        found_so_far = dict(
            org=org,
            ids=named,
            dry_run=dry_run,
            eligible=len(eligible),
            eligible_bytes=sum(r.size_bytes for r in eligible),
            held_skipped=sum(1 for r in rows if r.state == State.ACTIVE.value and (r.held_at is not None or r.org_held)),
            already_gone=sum(1 for r in rows if r.state != State.ACTIVE.value),
        )
        if dry_run:
            return PurgeResult(**found_so_far, would_delete=tuple(r.id for r in eligible[:PURGE_PREVIEW_LISTING]))
        # One event per org whose media is purged, each naming only that org's IDs: a purge by IDs
        # that spans orgs never shows one org's media under another in the audit trail.
        ids_by_org: dict[str, list[str]] = {}
        for row in rows:
            ids_by_org.setdefault(row.org_id, [])
            if not org:
                ids_by_org[row.org_id].append(row.id)
        with self.db.transaction() as session:
            for org_id, org_ids in sorted(ids_by_org.items()) if not org else [(org, [])]:
                session.add(AuditEvent(action="purge", actor=actor, org_id=org_id, reason=reason,
                                       details={"ids": org_ids[:1000],
                                                "eligible": sum(1 for r in eligible if r.org_id == org_id)}))
        counts = self.sweeper.purge_org(org) if org else self.sweeper.purge_ids([r.id for r in eligible])
        return PurgeResult(**found_so_far, counts=counts)
