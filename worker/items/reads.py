"""The reads of `media_items`: each takes a session (the caller's transaction) and plain values, and
returns rows, counts or sums. What to make of them stays with the caller."""

from __future__ import annotations

from sqlalchemy import select

from worker import models
from worker.dialect import Dialect

# -- registration: what is taken already -------------------------------------------------------------


def first_taken(session, dialect: Dialect, column: str, values: list[str]) -> str | None:
    """One of `values` already in `column` (`id` or `storage_key`) of any row, tombstones included, or None.
    As one array parameter on PostgreSQL: a list of placeholders, prepared and planned generically
    after a few runs, made the planner pick a scan of the whole table."""
    if not values:
        return None
    found = models.MediaItem.__table__.c[column]
    return session.execute(select(found).where(dialect.id_in(found, values)).limit(1)).scalar()


def existing(session, dialect: Dialect, column: str, values: list[str], *wanted: str) -> list:
    """The rows whose `column` is one of `values`: the `wanted` columns (by name), else every column."""
    if not values:
        return []
    table = models.MediaItem.__table__
    return session.execute(select(*((table.c[name] for name in wanted) if wanted else (table,)))
                           .where(dialect.id_in(table.c[column], values))).all()
