"""The engine, wired once: `build(settings)` makes every service from the settings, in one place.

    engine = build(get_settings())                   # or worker.runtime.engine(), cached per process
    engine.catalog.register(org="acme", file=path)   # the catalog API (worker.catalog)
    engine.runs.manual(worker="cli")                 # a recorded sweep
    engine.reconciler.run(grace=timedelta(days=1))

Services take plain values, never the whole settings; only this module reads `Settings` to wire
them. Tests build an engine on a store (or database) of their choosing with
`build(settings, store=..., database=...)` instead of patching module globals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from config.settings import Settings
from worker.binding import StoreBinding
from worker.catalog import Catalog
from worker.db import Database
from worker.reconcile import Reconciler
from worker.runs import SweepRuns
from worker.store import BlobStore, open_store
from worker.sweep import Sweeper
from worker.tombstones import Tombstones
from worker.verify import Verifier
from worker.watch import ExpiryWatch

if TYPE_CHECKING:
    from worker.volume.levels import Usage
    from worker.volume.monitor import VolumeMonitor
    from worker.volume.notifiers import Notifier


@dataclass(frozen=True)
class Engine:
    """The services of one process, sharing one database pool and one store."""

    db: Database
    store: BlobStore
    # The store's binding to this catalog (worker/binding.py), shared by every service of the process.
    binding: StoreBinding
    sweeper: Sweeper
    catalog: Catalog
    runs: SweepRuns
    reconciler: Reconciler
    verifier: Verifier
    tombstones: Tombstones
    # Deletes media within about a second of expiry between beat's sweeps; None when turned off.
    watch: ExpiryWatch | None
    # The volume monitor is made on demand: its module pulls in the HTTP client that only alerts need.
    _volume_monitor: Callable[..., "VolumeMonitor"] = field(repr=False)

    def volume_monitor(self, *, enqueue_sweep: Callable[[], None] | None = None) -> "VolumeMonitor":
        """The volume check; `enqueue_sweep` is how a critical level asks the fleet for a sweep."""
        return self._volume_monitor(enqueue_sweep=enqueue_sweep)

    def close(self) -> None:
        self.store.close()
        self.db.dispose()


def build(settings: Settings, *, store: BlobStore | None = None, database: Database | None = None) -> Engine:
    """Every service wired from `settings`; `store` and `database` replace the configured ones (tests)."""
    db = database if database is not None else Database(settings.database_url)
    store = store if store is not None else open_store(settings.storage_url, **store_options(settings))
    binding = StoreBinding(db, store)
    sweeper = Sweeper(db, store, claim_lease=settings.claim_lease, batch_size=settings.sweep_batch_size, binding=binding)

    def volume_monitor_on_store(*, enqueue_sweep: Callable[[], None] | None = None) -> "VolumeMonitor":
        from worker.volume.measure import store_usage

        measure = store_usage(db, store, capacity_bytes=settings.s3_capacity_bytes)
        return volume_monitor(settings, db, measure, enqueue_sweep=enqueue_sweep)

    return Engine(
        db=db,
        store=store,
        binding=binding,
        sweeper=sweeper,
        catalog=Catalog(db, store, sweeper, default_retention=settings.default_retention, presign_ttl=settings.presign_ttl),
        runs=SweepRuns(db, sweeper, interval=settings.sweep_interval, batch_size=settings.sweep_batch_size,
                       fanout_max=settings.sweep_fanout_max),
        reconciler=Reconciler(db, store, binding=binding),
        verifier=Verifier(db, store, binding=binding),
        tombstones=Tombstones(db),
        watch=ExpiryWatch(sweeper, interval_s=settings.watch_interval.total_seconds()) if settings.watch_interval else None,
        _volume_monitor=volume_monitor_on_store,
    )


def volume_monitor(settings: Settings, db: Database, measure: Callable[[], "Usage"], *,
                   enqueue_sweep: Callable[[], None] | None = None,
                   notifiers: Sequence["Notifier"] | None = None) -> "VolumeMonitor":
    """The volume check on `measure`, with the thresholds and intervals the settings name;
    `notifiers` replace the configured ones (tests)."""
    from worker.volume.levels import Thresholds
    from worker.volume.monitor import VolumeMonitor
    from worker.volume.state import FleetState

    thresholds = Thresholds(warn=settings.volume_warn, critical=settings.volume_critical,
                            hysteresis=settings.volume_hysteresis,
                            horizon_seconds=settings.volume_projection_horizon.total_seconds())
    return VolumeMonitor(FleetState(db, window=settings.volume_projection_window), measure,
                         storage_url=settings.storage_url, thresholds=thresholds, reminder=settings.volume_alert_reminder,
                         notifiers=volume_notifiers(settings) if notifiers is None else notifiers,
                         enqueue_sweep=enqueue_sweep)


def volume_notifiers(settings: Settings) -> list["Notifier"]:
    """The log, the webhook and the Alertmanagers the settings name, each post bounded by the same
    timeout and attempts."""
    from worker.volume.notifiers import configured_notifiers

    return configured_notifiers(
        alertmanager_urls=settings.alertmanager_urls, webhook_url=settings.alert_webhook_url,
        timeout=settings.alert_webhook_timeout.total_seconds(), attempts=settings.alert_webhook_attempts,
        check_interval=settings.volume_check_interval, metrics_port=settings.metrics_port)


def store_options(settings: Settings) -> dict:
    return {"delete_threads": settings.delete_threads, "endpoint_url": settings.s3_endpoint_url,
            "delete_mode": settings.s3_delete_mode, "addressing_style": settings.s3_addressing_style,
            "protected": protected_paths(settings), "create": settings.embedded_store}


def protected_paths(settings: Settings) -> dict[str, Path]:
    """What a filesystem media root must never contain: the data dir and a SQLite catalog file."""
    from sqlalchemy.engine import make_url

    protected: dict[str, Path] = {}
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        protected["the catalog database"] = Path(url.database)
    protected["the data dir (catalog, broker queue)"] = settings.data_dir
    return protected
