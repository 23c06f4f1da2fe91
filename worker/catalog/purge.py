"""Purge: delete media now regardless of expiry, through the sweep's pipeline; held media never."""

from __future__ import annotations

from collections.abc import Sequence

from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor, require_items
from worker.catalog.results import PurgeResult
from worker.db import Database
from config.errors import BadInput, NotFound
from worker.models import AuditEvent, Organization, Reason, State
from worker.store.keys import validate_id
from worker.sweep import Sweeper

# How many items a dry run names; the counts cover all of them.
PURGE_PREVIEW_LISTING = 1000
# IDs re-read per query after a purge, to say why its claims left an eligible item.
REREAD_BATCH = 1000


class Purge:
    def __init__(self, db: Database, sweeper: Sweeper):
        self.db = db
        self.sweeper = sweeper
        self.binding = sweeper.binding

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
            # By IDs: the named items claimed or deleted before the count. By org: the org's items claimed
            # (being deleted) at the count; its tombstones are not read (see `purge_candidates`).
            already_gone=sum(1 for r in rows if r.state != State.ACTIVE.value),
        )
        if dry_run:
            return PurgeResult(**found_so_far, would_delete=tuple(r.id for r in eligible[:PURGE_PREVIEW_LISTING]))
        # Deletes media that has not expired: only ever on the store this catalog is bound to.
        self.binding.require()
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
        eligible_ids = [r.id for r in eligible]
        taken: set[str] = set()
        if org:
            counts = self.sweeper.purge_org(org, taken=taken)
            # The org's claims skip rows another transaction holds locked (a retention rewrite, a sweep's
            # claim in flight): those still to be purged are claimed by name, which waits for the locks.
            passed_over = [media_id for media_id in eligible_ids if media_id not in taken]
            if passed_over:
                counts.add(self.sweeper.purge_ids(passed_over, reason=Reason.ORG_PURGE, taken=taken))
        else:
            counts = self.sweeper.purge_ids(eligible_ids, taken=taken)
        held_since, gone_since = self._not_taken(eligible_ids, taken)
        return PurgeResult(**found_so_far, counts=counts, held_since_count=held_since, gone_since_count=gone_since,
                           added_since_count=len(taken.difference(eligible_ids)))

    def _not_taken(self, eligible_ids: list[str], taken: set[str]) -> tuple[int, int]:
        """Why the eligible items this purge's claims did not take were left, read after the purge: how
        many are still active (a by-name claim, which waits for row locks, passed them over, so they were
        held when it came: a hold won) and how many are claimed or gone (someone else took them first)."""
        left = [media_id for media_id in eligible_ids if media_id not in taken]
        held = 0
        for start in range(0, len(left), REREAD_BATCH):
            with self.db.transaction() as session:
                rows = items_sql.purge_candidates(session, ids=left[start : start + REREAD_BATCH])
            held += sum(1 for row in rows if row.state == State.ACTIVE.value)
        return held, len(left) - held
