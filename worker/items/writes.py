"""The writes of `media_items`: each takes a session (the caller's transaction) and plain values, and
returns what the caller needs of the rows it changed."""

from __future__ import annotations

from worker import models
from worker.dialect import Dialect

# -- registration ------------------------------------------------------------------------------------


def insert_rows(session, dialect: Dialect, rows: list[dict]) -> None:
    """New active items, in the session's transaction (by COPY on PostgreSQL)."""
    dialect.insert_rows(session, models.MediaItem.__table__, rows)
