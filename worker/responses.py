"""The 404 body every edge answers with (the CLI's `lookup`, the HTTP lookup): built here, from
what the engine returns, so the engine itself knows nothing of status codes."""

from __future__ import annotations

from worker.catalog.results import Tombstone


def not_found_body(media_id: str, tombstone: Tombstone | None) -> dict:
    """`error: gone` with when and why for an expired, claimed or deleted item, `error: not_found` for an ID
    never seen."""
    if tombstone is None:
        return {"id": media_id, "status": 404, "error": "not_found"}
    return {
        "id": tombstone.id,
        "status": 404,
        "error": "gone",
        "deleted_at": tombstone.deleted_at.isoformat(),
        "reason": tombstone.reason,
        "state": tombstone.state,
    }
