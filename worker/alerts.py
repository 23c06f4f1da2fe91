"""The fleet's volume alert: notices to the log, Alertmanager's API and a generic webhook; the
samples and the alert state they are decided from live in the catalog (`worker.volume.state`).

One check (`VolumeMonitor.check`, run by the beat every few minutes):

1. measure: `statvfs` of the media root, or live bytes from the catalog for an object store;
2. one short transaction: insert the sample, drop samples older than the window, read the window,
   the database time and the alert state;
3. decide (pure): the level, with hysteresis, and whether that is a change, a reminder or a re-delivery;
4. compare-and-set: `UPDATE volume_alerts ... WHERE volume = :v AND version = :seen`. Of several
   workers that saw the same state exactly one updates the row, and only that one notifies; the others
   re-read and find nothing left to do;
5. after commit, with no transaction open: enqueue a sweep when critical, log the notice, POST the
   webhook (bounded by timeout x attempts), then clear `delivery_pending`. A delivery lost to a crash
   or a dead endpoint stays pending and a later check re-sends it.
6. post the fleet's alert to each Alertmanager (`/api/v2/alerts`), the way Prometheus does: at every
   check while a level is raised, with `endsAt` a few check intervals ahead (so an alert nobody
   re-posts, because the checks stopped, resolves by itself), and after a recovery the resolved alert
   (`endsAt` = when it cleared) at every check for as long again. Alertmanager dedupes by labels, so
   re-posts and posts from several workers make one alert; a failed post is simply repeated by the
   next check.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import structlog

from config.settings import Settings
from worker import metrics
from worker.db import Database
from worker.volume.http import HttpSink, url_origin
from worker.volume.levels import (
    Evaluation,
    Level,
    Projection,
    Thresholds,
    Usage,
    describe_seconds,
    evaluate,
    project,
)
from worker.volume.payloads import alertmanager_payload, postable_alerts
from worker.volume.state import AlertState, FleetState, Notification, decide, iso

log = structlog.get_logger("worker.alerts")

# Where Alertmanager takes alerts from their generators (Prometheus, and this worker).
ALERTMANAGER_API_PATH = "/api/v2/alerts"
# A posted alert's endsAt lies this many check intervals ahead, and a resolved alert is re-posted for
# as long: one or two late or lost checks never flap the alert, and when the checks stop altogether
# Alertmanager resolves it by itself. Prometheus uses the same factor (4 x its resend delay).
ENDS_AT_CHECK_INTERVALS = 4
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


# -- sinks ---------------------------------------------------------------------------------------


def is_alertmanager_api(url: str) -> bool:
    """A URL whose path is Alertmanager's alert API: whoever set it means an Alertmanager."""
    return urlsplit(url).path.rstrip("/").endswith(ALERTMANAGER_API_PATH)


def alertmanager_api_url(base: str) -> str:
    """`<base>/api/v2/alerts` for an Alertmanager base URL (one that already names the API is taken as it is);
    a path prefix (`--web.route-prefix`) and a query are kept."""
    if is_alertmanager_api(base):
        return base
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + ALERTMANAGER_API_PATH))


class WebhookSink(HttpSink):
    """The generic webhook: one notice per crossing, reminder and recovery, in Alertmanager's webhook shape."""

    def __init__(self, url: str, **options):
        super().__init__(url, sink="webhook", **options)

    def send(self, payload: dict) -> bool:  # type: ignore[override]
        return super().send(payload, alert_status=payload.get("status", "?"))


class AlertmanagerSink(HttpSink):
    """One Alertmanager's `POST /api/v2/alerts`: a JSON array of postable alerts."""

    def __init__(self, url: str, **options):
        super().__init__(url, sink="alertmanager", **options)


# Webhook URLs already told (in this process) that they name an Alertmanager: said once, not per check.
_advised: set[str] = set()


def sinks_from_settings(settings: Settings) -> tuple[WebhookSink | None, list[AlertmanagerSink]]:
    """The generic webhook (if any) and one sink per Alertmanager.

    A webhook URL whose path is `/api/v2/alerts` evidently means an Alertmanager, which refuses the
    webhook shape (HTTP 400): it is spoken to in Alertmanager's own API instead, and the log says
    once that MEDIA_RETENTION_ALERTMANAGER_URL is the setting for it.
    """
    options = {"timeout": settings.alert_webhook_timeout.total_seconds(), "attempts": settings.alert_webhook_attempts}
    alertmanagers = [alertmanager_api_url(url) for url in settings.alertmanager_urls]
    webhook = None
    if settings.alert_webhook_url and is_alertmanager_api(settings.alert_webhook_url):
        if settings.alert_webhook_url not in alertmanagers:
            alertmanagers.append(settings.alert_webhook_url)
        if settings.alert_webhook_url not in _advised:
            _advised.add(settings.alert_webhook_url)
            log.warning("volume.webhook_is_alertmanager", target=url_origin(settings.alert_webhook_url),
                        hint="MEDIA_RETENTION_ALERT_WEBHOOK_URL names Alertmanager's alert API; alerts are posted "
                             "there in that API's format. Set MEDIA_RETENTION_ALERTMANAGER_URL to the "
                             "Alertmanager's base URL instead.")
    elif settings.alert_webhook_url:
        webhook = WebhookSink(settings.alert_webhook_url, **options)
    return webhook, [AlertmanagerSink(url, **options) for url in alertmanagers]


# -- the monitor ---------------------------------------------------------------------------------


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
    def __init__(self, db: Database, settings: Settings, measure: Callable[[], Usage], *,
                 enqueue_sweep: Callable[[], None] | None = None, webhook: WebhookSink | None = None,
                 alertmanagers: list[AlertmanagerSink] | None = None):
        self.db = db
        self.settings = settings
        self.measure = measure
        self.enqueue_sweep = enqueue_sweep
        configured_webhook, configured_alertmanagers = sinks_from_settings(settings)
        self.webhook = webhook if webhook is not None else configured_webhook
        self.alertmanagers = alertmanagers if alertmanagers is not None else configured_alertmanagers
        self.alert_ends_in = ENDS_AT_CHECK_INTERVALS * settings.volume_check_interval
        # The /metrics this worker serves the volume gauges on: Alertmanager links it as the alert's source.
        self.generator_url = (f"http://{socket.gethostname()}:{settings.metrics_port}/metrics"
                              if settings.metrics_port else None)
        self.thresholds = Thresholds.from_settings(settings)
        self.fleet = FleetState(db, window=settings.volume_projection_window)
        slack = self.webhook.worst_case_seconds + REDELIVERY_SLACK_SECONDS if self.webhook else 0
        self.redeliver_after = timedelta(seconds=slack)
        metrics.publish_volume_settings(settings)

    # -- the check --

    def check(self) -> VolumeReport:
        """Sample, decide with the fleet, notify if this worker won the change; never raises for a sink."""
        usage = self.measure()
        report = VolumeReport(storage=self.settings.storage_url, usage=usage, thresholds=self.thresholds)
        if not usage.ratios():
            report.message = CAPACITY_UNKNOWN
            log.warning("volume.capacity_unknown", used_bytes=usage.used_bytes, message=CAPACITY_UNKNOWN)
            metrics.VOLUME_USED_BYTES.set(usage.used_bytes)
            return report
        window, now, state = self.fleet.record(usage)
        projection = project(window)
        notification = None
        for _ in range(CAS_ROUNDS):
            evaluation = evaluate(usage, projection, state.level, self.thresholds)
            new, notification = decide(state, evaluation, now, reminder=self.settings.volume_alert_reminder,
                                       redeliver_after=self.redeliver_after, webhook=self.webhook is not None)
            if notification is None:
                break
            if self.fleet.compare_and_set(state.version, new):
                state = replace(new, version=state.version + 1)
                notification = replace(notification, state=state)
                break
            log.debug("volume.state_race_lost", seen_version=state.version)
            notification = None
            now, state = self.fleet.reread()
        report.projection, report.evaluation, report.alert = projection, evaluation, state
        report.notification = notification.kind if notification else None
        log.info("volume.checked", level=evaluation.level.value, reason=evaluation.reason, alert_level=state.level.value,
                 **{f"used_{r}_ratio": round(v, 4) for r, v in usage.ratios().items()},
                 projection=projection.status, full_in_seconds=projection.to_dict()["seconds_to_full"],
                 samples=len(window))
        # The sweep goes to the queue before any webhook is attempted, so a slow endpoint never holds it back.
        if evaluation.level is Level.CRITICAL and self.enqueue_sweep is not None:
            report.sweep = self._enqueue_sweep(evaluation)
        if notification is not None:
            self._announce(notification, usage, projection, report.sweep)
        if self.alertmanagers:
            self._post_to_alertmanagers(state, now, usage, projection, report.sweep)
        self._publish(usage, projection, state.level)
        return report

    def _enqueue_sweep(self, evaluation: Evaluation) -> str:
        try:
            self.enqueue_sweep()
        except Exception as exc:  # noqa: BLE001 - a broker outage must not stop the alert itself
            log.error("volume.sweep_enqueue_failed", error=f"{type(exc).__name__}: {exc}")
            return f"enqueueing an immediate sweep failed ({type(exc).__name__}); the scheduled sweeps continue"
        log.warning("volume.sweep_enqueued", reason=evaluation.reason, ratio=round(evaluation.ratio, 4))
        return "an immediate sweep was enqueued (it deletes only expired media)"

    def _announce(self, notification: Notification, usage: Usage, projection: Projection, sweep_note: str | None) -> None:
        state = notification.state
        emit = log.info if state.level is Level.OK else log.warning
        emit(notification.event, level=state.level.value, previous_level=state.previous_level.value, reason=state.reason,
             since=iso(state.since), **{f"used_{r}_ratio": round(v, 4) for r, v in usage.ratios().items()},
             projection=projection.status, full_in=describe_seconds(projection.seconds_to_full), sweep=sweep_note,
             webhook=self.webhook is not None, alertmanagers=len(self.alertmanagers))
        if self.webhook is None:
            return
        payload = alertmanager_payload(notification, usage, projection, thresholds=self.thresholds,
                                       storage_url=self.settings.storage_url, sweep_note=sweep_note)
        if self.webhook.send(payload):
            self.fleet.delivered(state.version)

    def _post_to_alertmanagers(self, state: AlertState, now: datetime, usage: Usage, projection: Projection,
                               sweep_note: str | None) -> None:
        alerts = postable_alerts(state, now, usage, projection, thresholds=self.thresholds,
                                 storage_url=self.settings.storage_url, ends_in=self.alert_ends_in,
                                 sweep_note=sweep_note, generator_url=self.generator_url)
        if not alerts:
            return
        alert_status = "resolved" if state.level is Level.OK else "firing"
        for alertmanager in self.alertmanagers:
            alertmanager.send(alerts, alert_status=alert_status)

    def _publish(self, usage: Usage, projection: Projection, level: Level) -> None:
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

    # -- read-only, for `media-retention volume` --

    def status(self) -> VolumeReport:
        """Measure now and read the fleet's samples and alert state, writing nothing."""
        usage = self.measure()
        report = VolumeReport(storage=self.settings.storage_url, usage=usage, thresholds=self.thresholds)
        window, now, state = self.fleet.read()
        report.alert = state
        if not usage.ratios():
            report.message = CAPACITY_UNKNOWN
            return report
        report.projection = project([*window, replace(usage, taken_at=now)])
        report.evaluation = evaluate(usage, report.projection, state.level, self.thresholds)
        return report
