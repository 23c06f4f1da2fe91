"""Retention policy as pure functions: TTL and retention bounds, and when an item expires."""

from __future__ import annotations

from datetime import datetime, timedelta

from worker.durations import format_duration, parse_duration
from worker.errors import BadInput

# Bounds from the vendor contract (seeds/003): a per-upload TTL of 1 hour to 30 days inclusive.
TTL_MIN = timedelta(hours=1)
TTL_MAX = timedelta(days=30)
# An org retention below an hour would be a TTL in disguise; the design sets this floor.
RETENTION_MIN = timedelta(hours=1)


def parse_ttl(text: str) -> timedelta:
    ttl = parse_duration(text)
    if not TTL_MIN <= ttl <= TTL_MAX:
        raise BadInput(f"TTL {text!r} is out of bounds: it must be between 1h and 30d inclusive.")
    return ttl


def parse_retention(text: str) -> timedelta:
    retention = parse_duration(text)
    if retention < RETENTION_MIN:
        raise BadInput(f"retention {text!r} is too short: it must be at least 1h.")
    return retention


def effective_lifetime(ttl: timedelta | None, org_retention: timedelta) -> timedelta:
    """A TTL overrides the org retention in both directions (seeds/003)."""
    return ttl if ttl is not None else org_retention


def expires_at(created_at: datetime, ttl: timedelta | None, org_retention: timedelta) -> datetime:
    return created_at + effective_lifetime(ttl, org_retention)


def describe(value: timedelta | None) -> str | None:
    return None if value is None else format_duration(value)
