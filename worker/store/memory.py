"""An in-memory blob store for unit tests: the `BlobStore` contract with no disk and no server.

Keys are validated exactly as the other stores validate them, so a test on it cannot pass with a
key a real store would refuse. Not for production: nothing survives the process.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from config.errors import BadInput, BlobExists
from worker.store import BlobDigest, BlobInfo, BlobStore, DeleteResult, PartialUpload, open_source
from worker.store.keys import validate_key


class MemoryStore(BlobStore):
    cheap_marker = True

    def __init__(self, name: str = "test"):
        self.url = f"memory://{name}"
        self._blobs: dict[str, tuple[bytes, datetime]] = {}
        self._marker: bytes | None = None
        # Sweeps delete from helper threads while tests register: one lock keeps the dict consistent.
        self._lock = threading.Lock()

    def put_file(self, key: str, source: Path) -> int:
        key = validate_key(key)
        with open_source(Path(source)) as handle:
            data = handle.read()
        with self._lock:
            if key in self._blobs:
                raise BlobExists(f"storage key {key!r} already holds a blob; refusing to overwrite it.")
            self._blobs[key] = (data, datetime.now(timezone.utc))
        return len(data)

    def put_bytes(self, key: str, data: bytes, modified: datetime | None = None) -> None:
        """Plant a blob directly (a test's way to leave an orphan or an old blob behind)."""
        with self._lock:
            self._blobs[validate_key(key)] = (data, modified or datetime.now(timezone.utc))

    def stat(self, key: str) -> BlobInfo | None:
        key = validate_key(key)
        with self._lock:
            found = self._blobs.get(key)
        return None if found is None else BlobInfo(key, len(found[0]), found[1])

    def digest(self, key: str) -> BlobDigest | None:
        key = validate_key(key)
        with self._lock:
            found = self._blobs.get(key)
        return None if found is None else BlobDigest(size=len(found[0]), sha256=hashlib.sha256(found[0]).hexdigest())

    def delete_many(self, keys: list[str]) -> list[DeleteResult]:
        results = []
        for key in keys:
            try:
                key = validate_key(key)
            except BadInput as exc:  # a refused key is that key's failure, as in the other stores
                results.append(DeleteResult(key, ok=False, error=f"refused: {exc}"))
                continue
            with self._lock:
                missing = self._blobs.pop(key, None) is None
            results.append(DeleteResult(key, ok=True, missing=missing))
        return results

    def read_marker(self) -> bytes | None:
        with self._lock:
            return self._marker

    def write_marker(self, content: bytes) -> bool:
        with self._lock:
            if self._marker is not None:
                return False
            self._marker = bytes(content)
            return True

    def iter_keys(self, *, ordered: bool = False, partial_uploads: bool = False) -> Iterator[BlobInfo | PartialUpload]:
        with self._lock:
            snapshot = [(key, len(data), modified) for key, (data, modified) in self._blobs.items()]
        if ordered:
            snapshot.sort()
        for key, size, modified in snapshot:
            yield BlobInfo(key, size, modified)
