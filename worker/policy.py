"""Retention policy as pure functions: TTL and retention bounds, and when an item expires."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import BigInteger, SmallInteger

from config.durations import check_retention, format_duration, parse_duration
from config.errors import BadInput

# Bounds from the vendor contract (seeds/003): a per-upload TTL of 1 hour to 30 days inclusive.
TTL_MIN = timedelta(hours=1)
TTL_MAX = timedelta(days=30)


def integer_column_max(column) -> int:
    """The largest value an integer column holds on PostgreSQL (SQLite would take any)."""
    if isinstance(column.type, BigInteger):
        return 2**63 - 1
    if isinstance(column.type, SmallInteger):
        return 2**15 - 1
    return 2**31 - 1


def parse_ttl(text: str) -> timedelta:
    ttl = parse_duration(text)
    if not TTL_MIN <= ttl <= TTL_MAX:
        raise BadInput(f"TTL {text!r} is out of bounds: it must be between 1h and 30d inclusive.")
    return ttl


def parse_retention(text: str) -> timedelta:
    return check_retention(parse_duration(text), repr(text))


def effective_lifetime(ttl: timedelta | None, org_retention: timedelta) -> timedelta:
    """A TTL overrides the org retention in both directions (seeds/003)."""
    return ttl if ttl is not None else org_retention


def expires_at(created_at: datetime, ttl: timedelta | None, org_retention: timedelta) -> datetime:
    return created_at + effective_lifetime(ttl, org_retention)


def describe(value: timedelta | None) -> str | None:
    return None if value is None else format_duration(value)
