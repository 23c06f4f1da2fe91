"""Helpers the end-to-end modules share."""

import hashlib
import os
import sqlite3
from pathlib import Path


def snapshot(data_dir):
    """Everything a command could change on the embedded defaults: catalog rows and media files with their
    bytes. Two equal snapshots around a refused command prove it changed nothing."""
    database = data_dir / "catalog.sqlite3"
    rows = {}
    if database.exists():
        with sqlite3.connect(database) as connection:
            for table in ("organizations", "media_items", "media_variants", "audit_events"):
                rows[table] = connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    files = {}
    media = data_dir / "media"
    for directory, _, names in os.walk(media):
        for name in names:
            path = os.path.join(directory, name)
            files[os.path.relpath(path, media)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return rows, files
