"""Tombstone compaction, once a day when MEDIA_RETENTION_TOMBSTONE_RETENTION is set."""

from __future__ import annotations

import socket

from config.schedule import COMPACT_TASK
from config.settings import get_settings
from tasks import task_context
from worker import runtime
from worker.app import app


@app.task(name=COMPACT_TASK)
def compact_tombstones() -> dict:
    """Remove tombstones deleted longer ago than the tombstone retention (nothing when it is off)."""
    with task_context(compact_tombstones):
        retention = get_settings().tombstone_retention
        if not retention:
            return {"skipped": "tombstone retention is off"}
        actor = f"compaction@{compact_tombstones.request.hostname or socket.gethostname()}"[:128]
        return runtime.engine().tombstones.compact(older_than=retention, actor=actor).to_dict()
