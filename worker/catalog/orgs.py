"""Organizations: create one, change its retention (rescheduling its stored items no retention rule covers),
show it (with its rules)."""

from __future__ import annotations

from datetime import timedelta

import structlog
from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor, took_effect_at
from worker.catalog.results import OrgView
from worker.catalog.rules import rule_list, rules_of
from worker.db import Database
from config.errors import NotFound
from worker.models import AuditEvent, Organization, State
from worker.policy import describe, parse_retention
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")


class Orgs:
    def __init__(self, db: Database, *, default_retention: timedelta):
        self.db = db
        self.default_retention = default_retention

    def set(self, org_id: str, retention: str | None = None, *, actor: str | None = None) -> OrgView:
        """Create the org or change its retention; the change applies to stored items from the next sweep.

        Without `retention` an existing org is left exactly as it is: the default retention only
        applies to an org being created, and an operation that changes nothing reschedules nothing."""
        validate_id(org_id, "organization id")
        new = parse_retention(retention) if retention is not None else None
        actor = validation.actor(actor or default_actor())
        with self.db.transaction() as session:
            # Row lock: registrations read the retention under a share lock, so none slips between
            # this update and the rewrite of expiry times below.
            org = session.get(Organization, org_id, with_for_update=True)
            created = org is None
            old = None if created else org.retention_seconds
            if created:
                seconds = int((new or self.default_retention).total_seconds())
                org = Organization(id=org_id, retention_seconds=seconds)
                session.add(org)
                session.flush()
            else:
                seconds = int(new.total_seconds()) if new is not None else old
            rewritten = 0
            if not created and seconds != old:
                org.retention_seconds = seconds
                # Only the items no retention rule covers live the org's period; read under the org's lock,
                # which every rule change takes too.
                rules = rules_of(session, [org_id]).get(org_id)
                governed = items_sql.governed_by(self.db.sql, rules, None) if rules else None
                rewritten = items_sql.rewrite_expiry(session, org_id, seconds, governed)
            if created or seconds != old:
                # Stamped only now, by the database's clock (`verify` compares it with claim times): the
                # rewrite may have waited for claims of the org's rows under the old period, which finish.
                stamp = took_effect_at(session)
                if not created:
                    org.updated_at = stamp
                session.add(
                    AuditEvent(
                        at=stamp,
                        action="org_create" if created else "org_set",
                        actor=actor,
                        org_id=org_id,
                        details={"retention": describe(timedelta(seconds=seconds)),
                                 "previous": None if old is None else describe(timedelta(seconds=old)),
                                 "items_rescheduled": rewritten},
                    )
                )
        log.info("org.set", org=org_id, retention_s=seconds, created=created, changed=created or seconds != old,
                 items_rescheduled=rewritten)
        return self.show(org_id)

    def show(self, org_id: str) -> OrgView:
        validate_id(org_id, "organization id")
        with self.db.transaction() as session:
            org = session.get(Organization, org_id)
            if org is None:
                raise NotFound(f"organization {org_id!r} does not exist; create it with `media-retention org set {org_id}`.")
            by_state = items_sql.live_counts_by_state(session, org_id)
            rules = rules_of(session, [org_id]).get(org_id, {})
            active_bytes = items_sql.active_bytes(session, org_id)
        return OrgView(
            org=org.id,
            retention=describe(timedelta(seconds=org.retention_seconds)),
            retention_seconds=org.retention_seconds,
            held=org.held_at is not None,
            hold_reason=org.hold_reason,
            # Live states only: an org's tombstones have no index by org (migration 0014), and counting them
            # would read every row the org ever had. The deletion trail is `audit --org ORG --action deleted`.
            items={state.value: int(by_state.get(state.value, 0)) for state in (State.ACTIVE, State.DELETING)},
            active_bytes=int(active_bytes or 0),
            rules=tuple(rule_list(rules)),
        )
