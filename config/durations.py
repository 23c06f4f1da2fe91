"""Durations as operators write them: `30s`, `15m`, `1h`, `7d`, `2w`, or ISO-8601 (`PT1H`, `P30D`).

Everything is whole seconds: retention is never finer than that, and whole seconds keep the
SQLite and PostgreSQL expiry arithmetic exact.
"""

from __future__ import annotations

import functools
import re
from datetime import timedelta

import isodate

from config.errors import BadInput

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# ASCII digits only (`\d` would take any script's), and a number short enough to read back.
_SHORT = re.compile(r"\s*([0-9]{1,15})\s*([smhdw])\s*", re.IGNORECASE)
# No setting or policy here is longer than a retention can be (68 years, what the catalog's
# integer column holds); a century leaves room and stays far inside what datetimes can add.
DURATION_MAX = timedelta(days=36500)


def parse_duration(text: str) -> timedelta:
    """Parse a positive duration or raise `BadInput` with a sentence naming the bad text."""
    # A manifest names the same few TTLs on every line: parsed once each (errors are never cached).
    return _parse_cached(text) if isinstance(text, str) else _parse(text)


def _parse(text: str) -> timedelta:
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"empty duration {text!r}; use e.g. 30s, 15m, 1h, 7d, 2w or PT1H.")
    too_long = f"duration {text[:40]!r}{'...' if len(text) > 40 else ''} is too long: at most {DURATION_MAX.days}d."
    match = _SHORT.fullmatch(text)
    if match:
        seconds = int(match.group(1)) * _UNITS[match.group(2).lower()]
    elif re.fullmatch(r"\s*[0-9]{16,}\s*[smhdw]\s*", text, re.IGNORECASE):
        raise BadInput(too_long)
    elif text.strip().upper().startswith("P"):
        if len(text) > 64:
            raise BadInput(too_long)
        try:
            parsed = isodate.parse_duration(text.strip().upper())
        except OverflowError:
            raise BadInput(too_long) from None
        except (isodate.ISO8601Error, ValueError) as exc:
            raise BadInput(f"malformed ISO-8601 duration {text!r}.") from exc
        if not isinstance(parsed, timedelta):
            # isodate returns a Duration for years and months, whose length depends on the calendar.
            raise BadInput(f"duration {text!r} uses years or months; give it in days or weeks.")
        seconds = parsed.total_seconds()
        if seconds != int(seconds):
            raise BadInput(f"duration {text!r} is not a whole number of seconds.")
        seconds = int(seconds)
    else:
        raise BadInput(f"malformed duration {text!r}; use e.g. 30s, 15m, 1h, 7d, 2w or PT1H.")
    if seconds <= 0:
        raise BadInput(f"duration {text!r} must be longer than zero.")
    if seconds > DURATION_MAX.total_seconds():
        raise BadInput(too_long)
    return timedelta(seconds=seconds)


_parse_cached = functools.lru_cache(maxsize=1024)(_parse)


def format_duration(value: timedelta) -> str:
    """The shortest exact short form: 90 days -> `90d`, 36 hours -> `36h`, 14 days -> `2w`."""
    seconds = int(value.total_seconds())
    for suffix, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{suffix}"
    return f"{seconds}s"


# An org retention below an hour would be a TTL in disguise; the design sets this floor.
RETENTION_MIN = timedelta(hours=1)
# What organizations.retention_seconds (a 32-bit integer column) can hold: about 68 years.
# A unit test holds it to the column's type, so the two cannot drift apart.
RETENTION_MAX = timedelta(seconds=2**31 - 1)


def check_retention(retention: timedelta, shown: str) -> timedelta:
    if retention < RETENTION_MIN:
        raise BadInput(f"retention {shown} is too short: it must be at least 1h.")
    if retention > RETENTION_MAX:
        raise BadInput(f"retention {shown} is too long: at most {RETENTION_MAX.days}d, what the catalog stores.")
    return retention
