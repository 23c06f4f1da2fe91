"""Retention policy as pure functions: TTL and retention bounds, and when an item expires."""

from __future__ import annotations

import re
from collections.abc import Mapping
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


# -- retention rules by content type -----------------------------------------------------------------
#
# An org may give MIME patterns their own retention (`org rule set ORG --mime image/* --retention 30d`).
# Which period an item lives is decided here, once, for every writer of `expires_at`: registrations,
# manifests and adopt call `lifetime`; the SQL rewrites of a rule or retention change select their rows by
# `worker.items.reads.governed_by`, which a test holds to `governing_pattern` item by item.

# A pattern's two halves: RFC 6838 restricted-name characters, lowercase (patterns are stored lowercased).
_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]*"
_PATTERN = re.compile(rf"({_TOKEN})/({_TOKEN}|\*)")
PATTERN_LENGTH = 255


def parse_mime_pattern(text: str) -> str:
    """`type/subtype` or `type/*`, lowercased; anything else (`*/*`, parameters, blanks) is bad input."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput("--mime must not be empty: give type/subtype or type/*, e.g. image/png or image/*.")
    pattern = text.lower()
    if len(pattern) > PATTERN_LENGTH or not _PATTERN.fullmatch(pattern):
        raise BadInput(f"invalid MIME pattern {text!r}: give type/subtype or type/* (no parameters, no */*), "
                       f"e.g. image/png or image/*.")
    return pattern


def mime_essence(mime: str) -> str:
    """The part of a MIME type rules match: `type/subtype` lowercased, parameters dropped
    (`Audio/OGG; codecs=opus` -> `audio/ogg`). `worker.dialect.Dialect.mime_essence` is the same in SQL."""
    return mime.split(";", 1)[0].rstrip(" ").lower()


def governing_pattern(rules: Mapping[str, int] | None, mime: str) -> str | None:
    """The most specific of `rules` (pattern -> seconds) matching `mime`: the exact `type/subtype` over
    `type/*`; None when no rule matches (the org's period applies)."""
    if not rules:
        return None
    essence = mime_essence(mime)
    if essence in rules:
        return essence
    wildcard = essence.split("/", 1)[0] + "/*"
    return wildcard if wildcard in rules else None


def lifetime(ttl: timedelta | None, org_retention: timedelta, rules: Mapping[str, int] | None, mime: str) -> timedelta:
    """How long an item lives: its TTL (wins over every rule, in both directions), else the most specific
    rule matching its MIME type, else the org's period."""
    if ttl is not None:
        return ttl
    pattern = governing_pattern(rules, mime)
    return timedelta(seconds=rules[pattern]) if pattern is not None else org_retention


def fallback_seconds(rules: Mapping[str, int], pattern: str, org_retention_seconds: int) -> int:
    """What items `pattern` governs live once it is removed: `type/*` for an exact pattern if that rule
    exists, else the org's period."""
    wildcard = pattern.split("/", 1)[0] + "/*"
    if pattern != wildcard and wildcard in rules:
        return rules[wildcard]
    return org_retention_seconds
