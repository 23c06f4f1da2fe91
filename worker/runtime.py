"""Per-process engine objects for tasks: built lazily, after any fork, once per process."""

from __future__ import annotations

import functools

from config.settings import get_settings
from worker.catalog import Catalog


@functools.cache
def catalog() -> Catalog:
    return Catalog.from_settings(get_settings())


def reset() -> None:
    """Forget objects inherited across a fork (connection pools must never be shared)."""
    if catalog.cache_info().currsize:
        catalog().db.engine.dispose(close=False)
    catalog.cache_clear()
