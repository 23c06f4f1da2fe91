"""The storage URL's shape, checked where the settings are read and again where a store is opened."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from config.errors import BadInput
from config.redact import redact_url


def check_storage_url(url: str) -> None:
    """Refuse a storage URL that names no usable store, before anything is opened."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BadInput(f"invalid storage URL {redact_url(url)!r}: use file:///absolute/path.")
        path = unquote(parsed.path)
        if "\x00" in path:
            raise BadInput(f"invalid storage URL {redact_url(url)!r}: the path contains a NUL byte (%00).")
        if not path.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in path):
            raise BadInput(f"invalid storage URL {redact_url(url)!r}: use file:///absolute/path.")
        return
    if parsed.scheme == "s3":
        return  # the bucket, prefix and credentials are checked where the store is built
    raise BadInput(f"unsupported storage URL {redact_url(url)!r}: use file:///absolute/path or s3://bucket/prefix.")
