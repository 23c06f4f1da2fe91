"""Media IDs and storage keys: what is allowed, and where a new item's blob goes."""

from __future__ import annotations

import hashlib
import re

from config.errors import BadInput
from worker.models import ID_LENGTH, KEY_LENGTH

_ID = re.compile(r"[A-Za-z0-9._-]{1,%d}" % ID_LENGTH)
# NAME_MAX of Linux filesystems: a longer key step could never be a file name on a media volume.
KEY_STEP_BYTES = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_STEPS = frozenset(("", ".", ".."))
# Names the stores use for their own files, which no new ID or key may take: a filesystem upload's
# temporary file is `.incoming-<16 hex digits>` beside its target (worker/store/fs.py), and the binding
# marker sits at the top of the store (worker/store/MARKER_NAME). A whole family of names is reserved,
# not only the exact forms, so a name cannot even look like one of ours.
TEMP_PREFIX = ".incoming-"
TEMP_NAME = re.compile(r"\.incoming-[0-9a-f]{16}")
MARKER_PREFIX = ".media-retention"


# How much of a bad value an error quotes: enough to recognise it, while a 100 KB "ID" from a URL or a
# manifest stays a one-line error (and log line), not a copy of the input.
QUOTED_MAX = 64
# The ID rule of `validate_id` as a JSON Schema pattern (the HTTP API's OpenAPI description declares it,
# so schema-valid requests are exactly those the lookup accepts): the alphabet, no `..`, not only dots.
ID_PATTERN = rf"^(?!\.+$)(?!.*\.\.)[A-Za-z0-9._-]{{1,{ID_LENGTH}}}$"


def quoted(value: object) -> str:
    """`value` quoted for an error message, cut to QUOTED_MAX characters with its full length said."""
    if isinstance(value, str) and len(value) > QUOTED_MAX:
        return f"{value[:QUOTED_MAX]!r}\u2026 ({len(value)} characters)"
    return repr(value)


def validate_id(value: str, what: str = "media id") -> str:
    """IDs are 1-128 chars of A-Za-z0-9._- ; an ID made only of dots or containing `..` is refused
    because it would read as a path step in logs, URLs and keys."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value or set(value) == {"."}:
        raise BadInput(f"invalid {what} {quoted(value)}: use 1-{ID_LENGTH} characters of A-Z, a-z, 0-9, '.', '_' or '-' (no '..').")
    return value


def validate_new_id(value: str, what: str = "media id") -> str:
    """An ID for a new registration: valid, and not of a form the stores keep for their own files (an ID
    is the last step of its sharded key)."""
    validate_id(value, what)
    if value.startswith(TEMP_PREFIX):
        raise BadInput(f"invalid {what} {value!r}: IDs starting with {TEMP_PREFIX!r} are reserved for the store's own temporary files.")
    return value


def validate_key(key: str) -> str:
    """A relative, normalised, '/'-separated key: no NUL, no backslash, no empty, '.' or '..' step."""
    if not isinstance(key, str) or not key:
        raise BadInput("invalid storage key '': a key must not be empty.")
    if "\x00" in key:
        raise BadInput(f"invalid storage key {key!r}: it contains a NUL byte.")
    if key.startswith("/"):
        raise BadInput(f"invalid storage key {key!r}: keys are relative to the store, not absolute paths.")
    if "\\" in key:
        raise BadInput(f"invalid storage key {key!r}: use '/' to separate key parts, not '\\'.")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"invalid storage key {key!r}: it is not valid UTF-8.") from None
    if len(encoded) > KEY_LENGTH:
        raise BadInput(f"invalid storage key {key[:40]!r}...: longer than {KEY_LENGTH} bytes.")
    # Every delete and every manifest line passes here: set and length tests, no per-step generator.
    parts = key.split("/")
    if not _BAD_STEPS.isdisjoint(parts):
        raise BadInput(f"invalid storage key {key!r}: empty, '.' and '..' path steps are not allowed.")
    if len(encoded) > KEY_STEP_BYTES and any(len(part.encode("utf-8")) > KEY_STEP_BYTES for part in parts):
        raise BadInput(f"invalid storage key {key[:40]!r}...: a step between slashes is longer than {KEY_STEP_BYTES} bytes.")
    return key


def validate_new_key(key: str) -> str:
    """A key for a new registration: valid, and free of control characters (a newline in a key would
    split every log line and listing that names it). Existing odd blobs stay addressable by
    `validate_key`, so reconcile can still remove them."""
    validate_key(key)
    if _CONTROL.search(key):
        raise BadInput(f"invalid storage key {key!r}: it contains a control character.")
    steps = key.split("/")
    if steps[0].startswith(MARKER_PREFIX):
        raise BadInput(f"invalid storage key {key!r}: names starting with {MARKER_PREFIX!r} at the top of the store are reserved for its binding marker.")
    if any(step.startswith(TEMP_PREFIX) for step in steps):
        raise BadInput(f"invalid storage key {key!r}: steps starting with {TEMP_PREFIX!r} are reserved for the store's own temporary files.")
    return key


def key_for_id(media_id: str) -> str:
    """`ab/cd/<id>`: two levels of 256 shards from the ID's hash keep every directory small
    (10 million items is ~150 files a directory) and spread S3 prefixes evenly."""
    digest = hashlib.sha256(media_id.encode()).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{media_id}"
