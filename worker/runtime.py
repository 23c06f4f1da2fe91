"""The engine of this process: built lazily from the settings, after any fork, once per process.

The Celery app (tasks, the metrics exporter) and the CLI both take their engine from here.
"""

from __future__ import annotations

from collections.abc import Callable

from config.settings import Settings, get_settings
from worker.engine import Engine, build
from worker.store import BlobStore
from worker.watch import WatchThread

_engine: Engine | None = None
_built_from: Settings | None = None
_store_factory: Callable[[Settings], BlobStore] | None = None
_watch: WatchThread | None = None


def engine() -> Engine:
    """This process's engine, rebuilt if the settings were reloaded since (tests reload them)."""
    global _engine, _built_from
    settings = get_settings()
    if _engine is None or _built_from is not settings:
        close()
        store = _store_factory(settings) if _store_factory is not None else None
        _engine, _built_from = build(settings, store=store), settings
    return _engine


def use_store(factory: Callable[[Settings], BlobStore] | None) -> None:
    """Build this process's store with `factory` instead of from the storage URL (test fleets)."""
    global _store_factory
    _store_factory = factory
    reset()


def start_watch() -> bool:
    """Start this process's expiry watch (worker/watch.py) unless it is off or already running."""
    global _watch
    if _watch is not None and _watch.alive:
        return True
    watch = engine().watch
    if watch is None:
        return False
    _watch = WatchThread(watch).start()
    return True


def stop_watch() -> None:
    """Stop the expiry watch, letting it finish the batch in hand."""
    global _watch
    if _watch is not None:
        _watch.stop()
    _watch = None


def reset() -> None:
    """Forget objects inherited across a fork (connection pools must never be shared)."""
    global _engine, _built_from, _watch
    _watch = None  # a thread is never inherited by a forked child
    if _engine is not None:
        _engine.db.engine.dispose(close=False)
    _engine, _built_from = None, None


def close() -> None:
    """Close this process's engine (its pool and store), if one was built."""
    global _engine, _built_from
    stop_watch()
    if _engine is not None:
        _engine.close()
    _engine, _built_from = None, None
