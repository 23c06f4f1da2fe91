"""The volume check: measure -> record -> decide -> compare-and-set -> notify.

One check (`VolumeMonitor.check`, run by the beat every few minutes, on any worker of the fleet):

1. measure: the store's own usage (`statvfs` of the media root), or live bytes from the catalog for
   an object store (`measure.py`);
2. record, in one short transaction: insert the sample, drop samples older than the window, read the
   window, the database time and the alert state (`state.FleetState`);
3. decide (pure): the level, with hysteresis and the projection (`levels.py`), and whether that is a
   change, a reminder or a re-delivery (`state.decide`);
4. compare-and-set the alert row on its version: of several workers that saw the same state exactly
   one wins and announces; the others re-read and find nothing left to do;
5. after commit, with no transaction open: enqueue a sweep when critical (before any notifier, so a
   slow endpoint never holds it back), then call every notifier in turn (`notifiers.py`). Once each
   notifier that keeps notices pending has taken the notice, `delivery_pending` is cleared; a delivery
   lost to a crash or a dead endpoint stays pending and a later check re-sends it.

The monitor takes plain values; `worker/engine.py` wires it from the settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from worker import metrics
from worker.volume import LOGGER
from worker.volume.levels import Evaluation, Level, Projection, Thresholds, Usage, describe_seconds, evaluate, project
from worker.volume.notifiers import CheckContext, Notifier
from worker.volume.state import AlertState, FleetState, Notification, decide

log = structlog.get_logger(LOGGER)

# A pending delivery is re-sent once the sender has certainly given up (its timeouts and pauses),
# plus this much, so a slow first sender and a re-sender never overlap.
REDELIVERY_SLACK_SECONDS = 5
# Compare-and-set rounds a check tries before leaving the state to the workers that won: each
# lost round means another worker just changed the state, which the next round takes into account.
CAS_ROUNDS = 3

CAPACITY_UNKNOWN = (
    "the media store is an object store with no capacity set; set MEDIA_RETENTION_S3_CAPACITY_BYTES "
    "(the bucket quota or budget in bytes) to get used ratios, levels and alerts"
)


@dataclass
class VolumeReport:
    """What a check (or `media-retention volume`) found."""

    storage: str
    usage: Usage
    thresholds: Thresholds
    projection: Projection = Projection("insufficient_data")
    evaluation: Evaluation | None = None
    alert: AlertState | None = None
    notification: str | None = None
    sweep: str | None = None
    message: str | None = None

    def to_dict(self) -> dict:
        usage = self.usage.to_dict()
        return {
            "storage": self.storage,
            "bytes": usage["bytes"],
            "inodes": usage["inodes"],
            "projection": self.projection.to_dict(),
            "level": self.evaluation.level.value if self.evaluation else "unknown",
            "reason": self.evaluation.reason if self.evaluation else None,
            "alert": self.alert.to_dict() if self.alert else None,
            "thresholds": {
                "warn": self.thresholds.warn,
                "critical": self.thresholds.critical,
                "hysteresis": self.thresholds.hysteresis,
                "horizon": describe_seconds(self.thresholds.horizon_seconds),
            },
            # What a check did, and why nothing could be judged: absent when there is nothing to say.
            **{name: value for name, value in (("notification", self.notification), ("sweep", self.sweep),
                                                ("message", self.message)) if value is not None},
        }


class VolumeMonitor:
    """The fleet-wide volume check, and the read-only view of it that `media-retention volume` shows."""

    def __init__(self, fleet: FleetState, measure: Callable[[], Usage], *, storage_url: str, thresholds: Thresholds,
                 reminder: timedelta, notifiers: Sequence[Notifier], enqueue_sweep: Callable[[], None] | None = None):
        """`measure` samples the store; `reminder` is how often a held level is re-announced; `notifiers`
        are called in order at every check; `enqueue_sweep` is how a critical level asks for a sweep."""
        self.fleet = fleet
        self.measure = measure
        self.storage_url = storage_url
        self.thresholds = thresholds
        self.reminder = reminder
        self.notifiers = list(notifiers)
        self.enqueue_sweep = enqueue_sweep
        metrics.publish_volume_thresholds(thresholds)

    @property
    def redelivers(self) -> bool:
        """Whether some notifier keeps undelivered notices pending (the generic webhook)."""
        return any(notifier.redelivers for notifier in self.notifiers)

    @property
    def redeliver_after(self) -> timedelta:
        """How long after a notice a check may re-send it: once its sender has certainly given up."""
        if not self.redelivers:
            return timedelta(0)
        worst = sum(notifier.worst_case_seconds for notifier in self.notifiers if notifier.redelivers)
        return timedelta(seconds=worst + REDELIVERY_SLACK_SECONDS)

    def check(self) -> VolumeReport:
        """Sample, decide with the fleet, notify if this worker won the change; never raises for a notifier."""
        usage = self.measure()
        report = VolumeReport(storage=self.storage_url, usage=usage, thresholds=self.thresholds)
        if not usage.ratios():
            report.message = CAPACITY_UNKNOWN
            log.warning("volume.capacity_unknown", used_bytes=usage.used_bytes, message=CAPACITY_UNKNOWN)
            metrics.VOLUME_USED_BYTES.set(usage.used_bytes)
            return report
        window, now, state = self.fleet.record(usage)
        projection = project(window)
        evaluation, now, state, notification = self._settle(usage, projection, now, state)
        report.projection, report.evaluation, report.alert = projection, evaluation, state
        report.notification = notification.kind if notification else None
        log.info("volume.checked", level=evaluation.level.value, reason=evaluation.reason, alert_level=state.level.value,
                 **{f"used_{r}_ratio": round(v, 4) for r, v in usage.ratios().items()},
                 projection=projection.status, full_in_seconds=projection.to_dict()["seconds_to_full"],
                 samples=len(window))
        # The sweep goes to the queue before any notifier is called, so a slow endpoint never holds it back.
        if evaluation.level is Level.CRITICAL and self.enqueue_sweep is not None:
            report.sweep = self._enqueue_sweep(evaluation)
        context = CheckContext(state=state, now=now, usage=usage, projection=projection, thresholds=self.thresholds,
                               storage_url=self.storage_url, sweep_note=report.sweep,
                               sinks=tuple(notifier.sink for notifier in self.notifiers))
        self._notify(notification, context)
        _publish(usage, projection, state.level)
        return report

    def _settle(self, usage: Usage, projection: Projection, now: datetime,
                state: AlertState) -> tuple[Evaluation, datetime, AlertState, Notification | None]:
        """Decide and compare-and-set until this worker's view of the alert is the fleet's: the evaluation,
        the time and state after the check, and the notice this worker won (None: nothing to announce)."""
        notification = None
        for _ in range(CAS_ROUNDS):
            evaluation = evaluate(usage, projection, state.level, self.thresholds)
            new, notification = decide(state, evaluation, now, reminder=self.reminder,
                                       redeliver_after=self.redeliver_after, webhook=self.redelivers)
            if notification is None:
                break
            if self.fleet.compare_and_set(state.version, new):
                state = replace(new, version=state.version + 1)
                notification = replace(notification, state=state)
                break
            log.debug("volume.state_race_lost", seen_version=state.version)
            notification = None
            now, state = self.fleet.reread()
        return evaluation, now, state, notification

    def _enqueue_sweep(self, evaluation: Evaluation) -> str:
        try:
            self.enqueue_sweep()
        except Exception as exc:  # noqa: BLE001 - a broker outage must not stop the alert itself
            log.error("volume.sweep_enqueue_failed", error=f"{type(exc).__name__}: {exc}")
            return f"enqueueing an immediate sweep failed ({type(exc).__name__}); the scheduled sweeps continue"
        log.warning("volume.sweep_enqueued", reason=evaluation.reason, ratio=round(evaluation.ratio, 4))
        return "an immediate sweep was enqueued (it deletes only expired media)"

    def _notify(self, notification: Notification | None, context: CheckContext) -> None:
        """Every notifier in turn; the notice stops being pending as soon as each notifier that keeps it
        pending has taken it (before the rest are called, so a slow one cannot cause a duplicate)."""
        keeping = [notifier for notifier in self.notifiers if notifier.redelivers]
        delivered = True
        for notifier in self.notifiers:
            taken = notifier.notify(notification, context)
            if notification is None or not notifier.redelivers:
                continue
            delivered = delivered and taken
            keeping.remove(notifier)
            if delivered and not keeping:
                self.fleet.delivered(notification.state.version)

    # -- read-only, for `media-retention volume` --

    def status(self) -> VolumeReport:
        """Measure now and read the fleet's samples and alert state, writing nothing."""
        usage = self.measure()
        report = VolumeReport(storage=self.storage_url, usage=usage, thresholds=self.thresholds)
        window, now, state = self.fleet.read()
        report.alert = state
        if not usage.ratios():
            report.message = CAPACITY_UNKNOWN
            return report
        report.projection = project([*window, replace(usage, taken_at=now)])
        report.evaluation = evaluate(usage, report.projection, state.level, self.thresholds)
        return report


def _publish(usage: Usage, projection: Projection, level: Level) -> None:
    """The volume gauges of this check."""
    for resource, ratio in usage.ratios().items():
        metrics.VOLUME_USED_RATIO.labels(resource=resource).set(ratio)
    metrics.VOLUME_USED_BYTES.set(usage.used_bytes)
    metrics.VOLUME_CAPACITY_BYTES.set(usage.total_bytes or math.nan)
    if usage.total_inodes:
        metrics.VOLUME_USED_INODES.set(usage.used_inodes)
        metrics.VOLUME_CAPACITY_INODES.set(usage.total_inodes)
    if projection.seconds_to_full is not None:
        metrics.VOLUME_FULL_IN_SECONDS.set(projection.seconds_to_full)
    else:
        metrics.VOLUME_FULL_IN_SECONDS.set(math.inf if projection.status == "not_filling" else math.nan)
    metrics.VOLUME_ALERT_LEVEL.set(level.rank)
    metrics.VOLUME_LAST_SAMPLE.set(time.time())
