"""What several use cases of the catalog share: who acts, and the rows an ID list names."""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence

from config.errors import NotFound
from worker import items as items_sql
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
