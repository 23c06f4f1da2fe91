"""Retention policy as pure functions: TTL and retention bounds, and when an item expires."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import BigInteger, SmallInteger

from worker.durations import format_duration, parse_duration
from worker.errors import BadInput
from worker.models import Organization

# Bounds from the vendor contract (seeds/003): a per-upload TTL of 1 hour to 30 days inclusive.
TTL_MIN = timedelta(hours=1)
TTL_MAX = timedelta(days=30)
# An org retention below an hour would be a TTL in disguise; the design sets this floor.
RETENTION_MIN = timedelta(hours=1)


def integer_column_max(column) -> int:
    """The largest value an integer column holds on PostgreSQL (SQLite would take any)."""
    if isinstance(column.type, BigInteger):
        return 2**63 - 1
    if isinstance(column.type, SmallInteger):
        return 2**15 - 1
    return 2**31 - 1


# What organizations.retention_seconds can hold: about 68 years.
RETENTION_MAX = timedelta(seconds=integer_column_max(Organization.__table__.c.retention_seconds))


def parse_ttl(text: str) -> timedelta:
    ttl = parse_duration(text)
    if not TTL_MIN <= ttl <= TTL_MAX:
        raise BadInput(f"TTL {text!r} is out of bounds: it must be between 1h and 30d inclusive.")
    return ttl


def parse_retention(text: str) -> timedelta:
    return check_retention(parse_duration(text), repr(text))


def check_retention(retention: timedelta, shown: str) -> timedelta:
    if retention < RETENTION_MIN:
        raise BadInput(f"retention {shown} is too short: it must be at least 1h.")
    if retention > RETENTION_MAX:
        raise BadInput(f"retention {shown} is too long: at most {RETENTION_MAX.days}d, what the catalog stores.")
    return retention


def effective_lifetime(ttl: timedelta | None, org_retention: timedelta) -> timedelta:
    """A TTL overrides the org retention in both directions (seeds/003)."""
    return ttl if ttl is not None else org_retention


def expires_at(created_at: datetime, ttl: timedelta | None, org_retention: timedelta) -> datetime:
    return created_at + effective_lifetime(ttl, org_retention)


def describe(value: timedelta | None) -> str | None:
    return None if value is None else format_duration(value)
