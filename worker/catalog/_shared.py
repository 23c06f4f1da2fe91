"""What several use cases of the catalog share: who acts, the rows an ID list names, and when a change
to them took effect."""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select

from config.errors import NotFound
from worker import items as items_sql
from worker.db import db_clock
from worker.models import MediaItem
from worker.store.keys import validate_id


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def require_items(session, ids: Sequence[str]) -> dict[str, MediaItem]:
    """The rows of `ids`, locked for update; NotFound (changing nothing) when one was never registered."""
    for media_id in ids:
        validate_id(media_id)
    found = {item.id: item for item in items_sql.locked_by_ids(session, list(ids))}
    for media_id in ids:
        if media_id not in found:
            raise NotFound(f"media id {media_id!r} was never registered; nothing was changed.")
    return found


def took_effect_at(session) -> datetime:
    """The database's wall clock, read once the change's statements have locked every item row they
    change (an org's hold mirrored by `mirror_org_hold`, its expiries by `rewrite_expiry`, named items by
    `require_items`): the moment the change took effect for claims, which `verify` compares claim times
    with (organizations.held_at and updated_at, items' held_at) and the audit trail records.

    A claim that took one of those rows first held its lock until it committed, so the statement that
    locked the row here waited for that commit, and the claim's `claimed_at` (its transaction's start)
    came earlier still: before this time. From now until this transaction commits the rows are locked
    by it, so a claim skips them or waits and then sees the committed change: no claim takes them under
    the old policy. Not `now()`: that is this transaction's start, which can precede a claim it then had
    to wait for. On SQLite writers run one at a time and 'now' is read afresh by each statement."""
    return session.scalar(select(db_clock()))
