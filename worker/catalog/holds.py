"""Holds: put items or a whole org on hold, or release them; held media is never deleted."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from worker import items as items_sql
from worker import validation
from worker.catalog._shared import default_actor, require_items, took_effect_at
from worker.catalog.results import HoldResult
from worker.db import Database
from config.errors import BadInput, Gone, NotFound
from worker.models import AuditEvent, Organization, State
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")


class Holds:
    def __init__(self, db: Database):
        self.db = db

    def set_hold(self, *, held: bool, reason: str, ids: Sequence[str] = (), org: str | None = None,
                 actor: str | None = None) -> HoldResult:
        """Put items or a whole org on hold (or release them). Recorded with who and why."""
        if not isinstance(reason, str) or not reason.strip():
            raise BadInput("a --reason is required: say why media is held or released.")
        validation.reason(reason)
        if bool(ids) == (org is not None):
            raise BadInput("give media IDs or --org, not both and not neither.")
        action = "hold" if held else "release"
        actor = validation.actor(actor or default_actor())
        changed: list[str] = []
        with self.db.transaction() as session:
            if org is not None:
                validate_id(org, "organization id")
                target = session.get(Organization, org, with_for_update=True)
                if target is None:
                    raise NotFound(f"organization {org!r} does not exist; nothing was changed.")
                if (target.held_at is not None) != held:
                    changed.append(org)
                # Mirror the hold on the org's active rows in the same transaction (see MediaItem.org_held).
                items_sql.mirror_org_hold(session, org, held)
                # Stamped only now: the mirror may have waited for claims of the org's rows, which finish.
                stamp = took_effect_at(session)
                target.held_at, target.hold_reason = (stamp, reason) if held else (None, None)
                session.add(AuditEvent(at=stamp, action=f"org_{action}", actor=actor, org_id=org, reason=reason))
            else:
                found = require_items(session, ids)
                if held:
                    gone = [media_id for media_id in ids if found[media_id].state != State.ACTIVE.value]
                    if gone:
                        raise Gone(f"media id {gone[0]!r} is already being deleted or gone; nothing was changed.")
                # Stamped once the rows are locked: a claim that reached one first has committed (and a hold was refused).
                stamp = took_effect_at(session)
                for media_id in dict.fromkeys(ids):
                    item = found[media_id]
                    if (item.held_at is not None) != held:
                        changed.append(media_id)
                    items_sql.set_hold(item, stamp if held else None, reason if held else None)
                    session.add(AuditEvent(at=stamp, action=action, actor=actor, org_id=item.org_id, media_id=media_id,
                                           reason=reason))
        log.info(f"media.{action}", org=org, ids=list(ids)[:20], changed=len(changed), actor=actor, reason=reason)
        return HoldResult(action=action, org=org, ids=tuple(dict.fromkeys(ids)), changed=tuple(changed), reason=reason,
                          actor=actor)
