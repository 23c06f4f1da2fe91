"""The media volume: how full it is, how soon it fills, and the fleet's one alert about it.

    levels.py      Usage, Level, Thresholds, evaluate, the projection (pure)
    filesystem.py  filesystem_usage: one statvfs
    measure.py     what a check measures: the store's own usage, else live catalog bytes
    state.py       AlertState, decide (pure); FleetState, the only writer of volume_samples / volume_alerts
    payloads.py    the alert in Alertmanager's two shapes (pure)
    http.py        HttpSink: the HTTP transport every posting notifier shares
    notifiers.py   Notifier and its classes: the log, the generic webhook, Alertmanager
    monitor.py     VolumeMonitor: measure -> record -> decide -> compare-and-set -> notify

`worker/engine.py` wires the monitor from the settings; nothing here reads them. This namespace
re-exports the pure names only (levels, filesystem): the filesystem store imports it, so it must not
pull in the database or an HTTP client.
"""

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

# The structlog logger name of every volume event, the one it has had from the start (`worker.alerts`),
# so log queries that select on it keep finding `volume.checked`, `volume.alert_firing` and the rest.
LOGGER = "worker.alerts"

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
