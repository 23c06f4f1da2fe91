"""Prometheus metric objects, on the default registry. Exposition (and multi-process collection) lives elsewhere.

Gauges carry `multiprocess_mode="mostrecent"`: when several worker processes share one exporter,
the value from the process that sampled last is the one that counts, not a sum or a stale maximum.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# -- media volume --------------------------------------------------------------------------------

VOLUME_USED_RATIO = Gauge(
    "media_retention_volume_used_ratio",
    "Used fraction of the media volume (0-1), by resource: bytes or inodes.",
    ["resource"],
    multiprocess_mode="mostrecent",
)
VOLUME_USED_BYTES = Gauge(
    "media_retention_volume_used_bytes",
    "Bytes used on the media volume (filesystem) or by live media (object store).",
    multiprocess_mode="mostrecent",
)
VOLUME_CAPACITY_BYTES = Gauge(
    "media_retention_volume_capacity_bytes",
    "Bytes usable on the media volume, or the configured object-store capacity.",
    multiprocess_mode="mostrecent",
)
VOLUME_USED_INODES = Gauge(
    "media_retention_volume_used_inodes",
    "Inodes used on the media volume's filesystem (absent where the filesystem reports none).",
    multiprocess_mode="mostrecent",
)
VOLUME_CAPACITY_INODES = Gauge(
    "media_retention_volume_capacity_inodes",
    "Inodes usable on the media volume's filesystem.",
    multiprocess_mode="mostrecent",
)
VOLUME_FULL_IN_SECONDS = Gauge(
    "media_retention_volume_full_in_seconds",
    "Projected seconds until the media volume is full: +Inf when not filling, NaN without enough samples.",
    multiprocess_mode="mostrecent",
)
VOLUME_ALERT_LEVEL = Gauge(
    "media_retention_volume_alert_level",
    "The fleet's volume alert level after the last check: 0 ok, 1 warning, 2 critical.",
    multiprocess_mode="mostrecent",
)
VOLUME_LAST_SAMPLE = Gauge(
    "media_retention_volume_last_sample_timestamp_seconds",
    "Unix time of this process' last volume sample; alert rules use it to ignore stale processes.",
    multiprocess_mode="mostrecent",
)
ALERT_DELIVERY_FAILURES = Counter(
    "media_retention_alert_delivery_failures_total",
    "Volume alert deliveries that failed after every attempt, by sink: webhook or alertmanager.",
    ["sink"],
)
# Both series exist from the start at 0, so `increase()` sees the first failure as one.
for _sink in ("webhook", "alertmanager"):
    ALERT_DELIVERY_FAILURES.labels(sink=_sink)

# Settings as gauges, so Prometheus rules compare against the thresholds the workers use.
VOLUME_WARN_RATIO = Gauge(
    "media_retention_volume_warn_ratio", "MEDIA_RETENTION_VOLUME_WARN.", multiprocess_mode="mostrecent"
)
VOLUME_CRITICAL_RATIO = Gauge(
    "media_retention_volume_critical_ratio", "MEDIA_RETENTION_VOLUME_CRITICAL.", multiprocess_mode="mostrecent"
)
VOLUME_PROJECTION_HORIZON_SECONDS = Gauge(
    "media_retention_volume_projection_horizon_seconds",
    "MEDIA_RETENTION_VOLUME_PROJECTION_HORIZON in seconds.",
    multiprocess_mode="mostrecent",
)


def publish_volume_thresholds(thresholds) -> None:
    """Export the volume thresholds in force (a `worker.volume.Thresholds`)."""
    VOLUME_WARN_RATIO.set(thresholds.warn)
    VOLUME_CRITICAL_RATIO.set(thresholds.critical)
    VOLUME_PROJECTION_HORIZON_SECONDS.set(thresholds.horizon_seconds)

# -- sweeps (counted where the work happens; summed across pool processes by the exporter) -------

DELETED_ITEMS = Counter(
    "media_retention_deleted_items_total",
    "Media items finalized as deleted, by deletion reason.",
    ["reason"],
)
FREED_BYTES = Counter("media_retention_freed_bytes_total", "Bytes of blobs deleted.")
DELETE_FAILURES = Counter(
    "media_retention_delete_failures_total",
    "Blob deletes that failed and were left for a retry with backoff.",
)
# How late items go: deleted_at - expires_at, both by the database clock, for items deleted because
# they expired (purges are early on purpose). The buckets straddle the target (p99 within 2 s) and
# reach the beat-only regime (a sweep interval, a claim lease) so a watch that stopped shows up.
DELETION_LATENESS = Histogram(
    "media_retention_deletion_lateness_seconds",
    "Seconds between an item's expiry and its deletion (deleted_at - expires_at), expired items only.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)


def observe_lateness(seconds: list[float]) -> None:
    for value in seconds:
        DELETION_LATENESS.observe(value)
