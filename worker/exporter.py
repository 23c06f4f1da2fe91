"""Prometheus exposition for a fleet of Celery worker processes.

Two kinds of numbers:
- counters and gauges set where work happens (worker/metrics.py). Under the prefork pool every
  process has its own; prometheus-client's multiprocess mode writes them to files in
  PROMETHEUS_MULTIPROC_DIR and the exporter sums them, so a scrape sees the whole machine.
- fleet status (backlog, oldest overdue, stuck deletions, last sweep) is read from the database at
  scrape time, so it is the same whichever worker is scraped.
"""

from __future__ import annotations

import os

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from worker.db import Database
from worker.status import fleet_status

log = structlog.get_logger("worker.exporter")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Liveness and readiness probes (Kubernetes, the image's HEALTHCHECK) ask for one counter by name:
# the answer proves the worker's main process and its exporter work, reads only the pool's metric
# files and never queries the catalog, so probing every few seconds costs nothing.
HEALTH_PROBE_PATH = "/metrics?name%5B%5D=media_retention_freed_bytes_total"


# The gauges FleetStatusCollector reads from the catalog at scrape time.
FLEET_STATUS_METRICS = (
    "media_retention_catalog_up",
    "media_retention_backlog_items",
    "media_retention_oldest_overdue_seconds",
    "media_retention_stuck_deletions",
    "media_retention_held_expired_items",
    "media_retention_locked_deletions",
    "media_retention_last_sweep_finished_timestamp_seconds",
    "media_retention_last_sweep_items",
)


class FleetStatusCollector(Collector):
    """Gauges computed from the catalog at scrape time."""

    def __init__(self, db: Database):
        self.db = db

    def describe(self):
        # Naming its metrics lets prometheus-client skip this collector (and its queries) for a scrape
        # that asks for other names only (`/metrics?name[]=...`): health probes use that.
        for name in FLEET_STATUS_METRICS:
            yield GaugeMetricFamily(name, "")

    def collect(self):
        try:
            numbers = fleet_status(self.db)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database does not
            log.warning("metrics.status_unavailable", error=str(exc))
            up = GaugeMetricFamily("media_retention_catalog_up", "1 when the catalog database answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("media_retention_catalog_up", "1 when the catalog database answered this scrape.")
        up.add_metric([], 1)
        yield up
        backlog = GaugeMetricFamily("media_retention_backlog_items", "Items due for deletion, by state (due: expired and unclaimed; deleting: claimed).", labels=["state"])
        backlog.add_metric(["due"], numbers["backlog"]["due"])
        backlog.add_metric(["deleting"], numbers["backlog"]["deleting"])
        yield backlog
        oldest = numbers["oldest_overdue"]
        yield GaugeMetricFamily("media_retention_oldest_overdue_seconds", "How long the oldest expired, undeleted item has been overdue (0 when none).",
                                value=oldest["overdue_seconds"] if oldest else 0)
        yield GaugeMetricFamily("media_retention_stuck_deletions", "Items in `deleting` whose delete failed or whose lease ran out.",
                                value=numbers["stuck"]["count"])
        yield GaugeMetricFamily("media_retention_held_expired_items", "Expired items kept because they or their org are on hold.",
                                value=numbers["held_expired"])
        yield GaugeMetricFamily("media_retention_missing_blob_items",
                                "Active items whose blob reconcile found missing (held ones are never tombstoned).",
                                value=numbers["missing_blob_items"]["count"])
        locked = GaugeMetricFamily("media_retention_locked_deletions",
                                   "Claimed items whose delete the store refuses because the version is locked (Object Lock), by reason.",
                                   labels=["reason"])
        for reason, count in numbers["locked_deletions"]["by_reason"].items():
            locked.add_metric([reason], count)
        yield locked
        last = numbers["last_finished_sweep"]
        if last:
            from datetime import datetime

            yield GaugeMetricFamily("media_retention_last_sweep_finished_timestamp_seconds", "When the last sweep finished (Unix time).",
                                    value=datetime.fromisoformat(last["finished_at"]).timestamp())
            items = GaugeMetricFamily("media_retention_last_sweep_items", "Counts of the last finished sweep, by outcome.", labels=["outcome"])
            for outcome in ("claimed", "deleted", "failed", "held_skipped"):
                items.add_metric([outcome], last[outcome])
            yield items


def build_registry(db: Database) -> CollectorRegistry:
    if os.environ.get(MULTIPROC_ENV):
        # The multiprocess collector cannot name its metrics in advance; without this a scrape that
        # asks for names (the health probe) would never consult it.
        registry = CollectorRegistry(support_collectors_without_names=True)
        MultiProcessCollector(registry)
        # The main process' own `process_*` series (the default registry has them already). Alert rules
        # need `process_start_time_seconds`: a worker that has run for half an hour and exported no volume
        # check or finished sweep is an alert, one that started a minute ago is not (deploy/prometheus).
        ProcessCollector(registry=registry)
    else:
        registry = REGISTRY
    registry.register(FleetStatusCollector(db))
    return registry


def serve(db: Database, port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=build_registry(db))
    multiprocess = bool(os.environ.get(MULTIPROC_ENV))
    log.info("metrics.serving", port=port, multiprocess=multiprocess)
    if not multiprocess:
        log.warning("metrics.single_process", hint=f"counters of prefork pool processes are not visible; set {MULTIPROC_ENV} "
                    "or start celery with `-A worker.app` so it is set before prometheus-client loads")


def process_exited(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)
