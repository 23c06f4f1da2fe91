"""Retention rules by content type: `org rule set ORG --mime PATTERN --retention D`, `org rule rm ORG --mime
PATTERN`, each with `--dry-run`.

A rule change applies to stored items from the next sweep, exactly as `org set --retention` does: in the
transaction that changes the rule, under the org's row lock, the expiry of the org's active TTL-less items
whose deciding period changes is rewritten (the items the pattern decides once set, or decided before it is
removed; `worker.items.reads.governed_by`). Registrations read the org under a share lock and the rules
after it (worker/catalog/registration.py), so a registration and a rule change serialize on the org row: an
item registered while a rule changes gets the expiry of the rules that committed before its insert. A change
that changes nothing (the same period again) writes, stamps and audits nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, select

from config.errors import NotFound
from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor, took_effect_at
from worker.catalog.preview import RetentionPreview, preview_of
from worker.db import Database
from worker.models import AuditEvent, Organization, RetentionRule
from worker.policy import describe, fallback_seconds, parse_mime_pattern, parse_retention
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")


def rules_of(session, org_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Each org's rules, pattern -> seconds (orgs without rules are absent). Callers that compute expiries
    from them read them after locking the org rows (share or update lock), so no rule change slips between
    this read and the write that relies on it."""
    wanted = sorted(set(org_ids))
    found: dict[str, dict[str, int]] = {}
    if not wanted:
        return found
    statement = select(RetentionRule.org_id, RetentionRule.mime_pattern, RetentionRule.retention_seconds).where(
        RetentionRule.org_id.in_(wanted))
    for org_id, pattern, seconds in session.execute(statement):
        found.setdefault(org_id, {})[pattern] = seconds
    return found


def rules_with_stamp(session, org_id: str) -> tuple[datetime | None, dict[str, int]]:
    """The org's `updated_at` and its rules, read in one statement (so one snapshot): `verify` judges a row
    by the rules that were in force at the stamp the row shows."""
    statement = (select(Organization.updated_at, RetentionRule.mime_pattern, RetentionRule.retention_seconds)
                 .outerjoin(RetentionRule, RetentionRule.org_id == Organization.id).where(Organization.id == org_id))
    stamp, rules = None, {}
    for updated_at, pattern, seconds in session.execute(statement):
        stamp = updated_at
        if pattern is not None:
            rules[pattern] = seconds
    return stamp, rules


def rule_list(rules: dict[str, int]) -> list[dict]:
    """Rules as `org show` lists them: by pattern, each with its period."""
    return [{"mime": pattern, "retention": describe(timedelta(seconds=seconds)), "retention_seconds": seconds}
            for pattern, seconds in sorted(rules.items())]


@dataclass(frozen=True)
class RuleChange:
    """What `org rule set` or `org rule rm` did."""

    action: str  # "rule_set" or "rule_rm"
    org: str
    mime: str
    retention: str | None  # the rule's period now (None once removed)
    previous: str | None  # the rule's period before (None: there was none)
    items_period: str  # the period the items the pattern decides(d) live from now
    changed: bool
    items_rescheduled: int

    def to_dict(self) -> dict:
        return {"action": self.action, "org": self.org, "mime": self.mime, "retention": self.retention,
                "previous": self.previous, "items_period": self.items_period, "changed": self.changed,
                "items_rescheduled": self.items_rescheduled}


class RetentionRules:
    def __init__(self, db: Database):
        self.db = db

    def set(self, org_id: str, mime: str, retention: str, *, actor: str | None = None,
            dry_run: bool = False) -> RuleChange | RetentionPreview:
        """Give the items of `mime` (`type/subtype` or `type/*`) in the org `retention`; the most specific rule
        wins. Returns the preview with `dry_run`."""
        validate_id(org_id, "organization id")
        pattern = parse_mime_pattern(mime)
        seconds = int(parse_retention(retention).total_seconds())
        return self._change(org_id, pattern, seconds, actor=actor, dry_run=dry_run)

    def remove(self, org_id: str, mime: str, *, actor: str | None = None,
               dry_run: bool = False) -> RuleChange | RetentionPreview:
        """Remove the org's rule for `mime`: its items fall back to `type/*` (if that rule exists) or the org's
        period. A rule that does not exist is NotFound, and nothing changes."""
        validate_id(org_id, "organization id")
        pattern = parse_mime_pattern(mime)
        return self._change(org_id, pattern, None, actor=actor, dry_run=dry_run)

    def _change(self, org_id: str, pattern: str, seconds: int | None, *, actor: str | None,
                dry_run: bool) -> RuleChange | RetentionPreview:
        actor = validation.actor(actor or default_actor())
        removing = seconds is None
        with self.db.transaction() as session:
            # Row lock (not for a dry run): registrations read the org under a share lock and its rules after
            # it, so none computes an expiry from rules this change is replacing.
            org = session.get(Organization, org_id, with_for_update=not dry_run)
            if org is None:
                raise NotFound(f"organization {org_id!r} does not exist; create it with `media-retention org set {org_id}`.")
            rules = rules_of(session, [org_id]).get(org_id, {})
            old = rules.get(pattern)
            if removing and old is None:
                raise NotFound(f"organization {org_id!r} has no retention rule for {pattern!r}; nothing was changed.")
            # The period the items the pattern decides live now, and the one they will live.
            fallback = fallback_seconds(rules, pattern, org.retention_seconds)
            current = old if old is not None else fallback
            target = fallback if removing else seconds
            # The items whose deciding rule is (set) or was (removed) this pattern: judged with it in place.
            decided_by = {**rules, pattern: old if removing else seconds}
            if dry_run:
                return preview_of(session, self.db.sql, org, decided_by, pattern, current, target)
            if not removing and old == seconds:
                # The same period again: nothing is written, stamped, rescheduled or audited.
                log.info("org.rule_set", org=org_id, mime=pattern, retention_s=seconds, changed=False, items_rescheduled=0)
                return RuleChange("rule_set", org_id, pattern, describe(timedelta(seconds=seconds)),
                                  describe(timedelta(seconds=old)), describe(timedelta(seconds=target)), False, 0)
            rewritten = 0
            if target != current:
                governed = items_sql.governed_by(self.db.sql, decided_by, pattern)
                rewritten = items_sql.rewrite_expiry(session, org_id, target, governed)
            # Stamped once the rewrite has locked the rows it changed (worker/catalog/_shared.py): `verify`
            # judges claims after this time by the new rules.
            stamp = took_effect_at(session)
            if removing:
                session.execute(delete(RetentionRule).where(RetentionRule.org_id == org_id,
                                                            RetentionRule.mime_pattern == pattern))
            elif old is None:
                session.add(RetentionRule(org_id=org_id, mime_pattern=pattern, retention_seconds=seconds,
                                          created_at=stamp, updated_at=stamp, actor=actor))
            else:
                rule = session.get(RetentionRule, (org_id, pattern))
                rule.retention_seconds, rule.updated_at, rule.actor = seconds, stamp, actor
            org.updated_at = stamp
            action = "rule_rm" if removing else "rule_set"
            result = RuleChange(action, org_id, pattern, None if removing else describe(timedelta(seconds=seconds)),
                                describe(timedelta(seconds=old)) if old is not None else None,
                                describe(timedelta(seconds=target)), True, rewritten)
            session.add(AuditEvent(at=stamp, action=action, actor=actor, org_id=org_id, details={
                "mime": pattern, "retention": result.retention, "previous": result.previous,
                "items_period": result.items_period, "items_rescheduled": rewritten}))
        log.info(f"org.{action}", org=org_id, mime=pattern, retention_s=seconds, previous_s=old, target_s=target,
                 changed=True, items_rescheduled=rewritten)
        return result
