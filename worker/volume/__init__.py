"""The media volume: how full it is, how soon it fills, and the alert level that means.

This package namespace re-exports the pure names (`levels`, `filesystem`) only: the filesystem store
imports it, so it must not pull in the database or an HTTP client.
"""

# The structlog logger name of every volume event, the one it has had from the start (`worker.alerts`),
# so log queries that select on it keep finding `volume.checked`, `volume.alert_firing` and the rest.
LOGGER = "worker.alerts"

from worker.volume.filesystem import filesystem_usage
from worker.volume.levels import (
    Evaluation,
    Level,
    Projection,
    Thresholds,
    Usage,
    describe_seconds,
    evaluate,
    fit_line,
    project,
    time_to_full,
)

__all__ = [
    "LOGGER",
    "Evaluation",
    "Level",
    "Projection",
    "Thresholds",
    "Usage",
    "describe_seconds",
    "evaluate",
    "filesystem_usage",
    "fit_line",
    "project",
    "time_to_full",
]
