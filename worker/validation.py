"""Limits of the free-text values that come from outside, taken from the columns that store them.

Every value an operator or an upstream service hands us is checked here (or in `keys`, `durations`
and `policy` for IDs, keys and durations) before anything is written, so bad input is one sentence
and changes nothing, on SQLite (which would store any length) exactly as on PostgreSQL (which would
fail the transaction).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from config.errors import BadInput
from worker.models import AuditEvent, MediaItem

MIME_LENGTH = MediaItem.__table__.c.mime_type.type.length
ACTOR_LENGTH = AuditEvent.__table__.c.actor.type.length
# Hold reasons are Text columns, so storage sets no bound; a reason is a sentence or a ticket
# reference, and 2000 characters keeps a pasted document out of every audit listing.
REASON_LENGTH = 2000
# A media type is `type/subtype` of RFC 6838's restricted-name characters, optionally followed by parameters
# as a Content-Type header carries them (`audio/ogg; codecs=opus`, RFC 9110: token=token or a quoted string),
# which retention rules ignore (worker/policy.py, mime_essence).
_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
_PARAMETER = r""" *; *[A-Za-z0-9!#$%&'*+.^_`|~-]+=(?:[A-Za-z0-9!#$%&'*+.^_`|~-]+|"[^"\\]*")"""
_MIME = re.compile(rf"{_NAME}/{_NAME}(?:{_PARAMETER})*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Creation times before the Unix epoch are typos (no media server predates it); after "now" by more
# than a clock-skew allowance they are too: a service whose clock runs a little ahead of the
# database may still register what it just received.
EARLIEST_CREATED_AT = datetime(1970, 1, 1, tzinfo=timezone.utc)
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=5)


def text(value: object, what: str, max_length: int) -> str:
    """A non-empty line of valid UTF-8 without control characters, at most `max_length` characters."""
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{what} must not be empty.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid UTF-8.") from None
    if _CONTROL.search(value):
        raise BadInput(f"{what} contains a control character (a newline, a tab, NUL...); give one line of text.")
    if len(value) > max_length:
        raise BadInput(f"{what} is {len(value)} characters long; at most {max_length} are stored.")
    return value


def actor(value: str) -> str:
    return text(value, "--by (who made the change)", ACTOR_LENGTH)


def reason(value: str) -> str:
    return text(value, "the --reason", REASON_LENGTH)


def mime_type(value: str) -> str:
    text(value, "the MIME type", MIME_LENGTH)
    if not _MIME.fullmatch(value):
        raise BadInput(f"invalid MIME type {value!r}: use type/subtype, e.g. image/jpeg (parameters as in audio/ogg; codecs=opus).")
    return value


def created_at(value: datetime, now: datetime) -> datetime:
    """A creation time between the Unix epoch and the database's `now` plus the skew allowance."""
    if value < EARLIEST_CREATED_AT:
        raise BadInput(f"--created-at {value.isoformat()} is before 1970; give the time the media was received.")
    if value > now + CLOCK_SKEW_ALLOWANCE:
        raise BadInput(f"--created-at {value.isoformat()} is in the future (the database's clock says {now.isoformat()}; "
                       f"up to {int(CLOCK_SKEW_ALLOWANCE.total_seconds() // 60)} minutes ahead are allowed for clock skew).")
    return value
