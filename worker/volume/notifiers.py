"""Who hears about the volume alert: one `Notifier` interface, one class per destination.

Every check calls each notifier once, in order, after the fleet's state is settled: the log
(`LogNotifier`), the generic webhook (`WebhookNotifier`) and each Alertmanager (`AlertmanagerNotifier`).
A notifier decides for itself what its destination should hear of a check: the log and the webhook
speak only when the check won a notice, Alertmanager hears the alert as it stands at every check.
A new destination is one more subclass, built in `configured_notifiers()`; a notifier that posts
over HTTP does it through the shared transport (`worker.volume.http.HttpSink`).
"""

from __future__ import annotations

import abc
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import structlog

from worker.volume import LOGGER
from worker.volume.http import RETRY_BACKOFF_SECONDS, HttpSink, url_origin
from worker.volume.levels import Level, Projection, Thresholds, Usage, describe_seconds
from worker.volume.payloads import alertmanager_payload, postable_alerts
from worker.volume.state import AlertState, Notification, iso

log = structlog.get_logger(LOGGER)

# Where Alertmanager takes alerts from their generators (Prometheus, and this worker).
ALERTMANAGER_API_PATH = "/api/v2/alerts"
# A posted alert's endsAt lies this many check intervals ahead, and a resolved alert is re-posted for
# as long: one or two late or lost checks never flap the alert, and when the checks stop altogether
# Alertmanager resolves it by itself. Prometheus uses the same factor (4 x its resend delay).
ENDS_AT_CHECK_INTERVALS = 4


@dataclass(frozen=True)
class CheckContext:
    """What a check knows when it notifies: the fleet's alert after the check, and what was measured."""

    state: AlertState
    now: datetime  # the database's time of the check
    usage: Usage
    projection: Projection
    thresholds: Thresholds
    storage_url: str
    # What became of the immediate sweep a critical level enqueues (None: none was asked for).
    sweep_note: str | None = None
    # The `sink` of every notifier this check notifies, in order: what the log says the notice went to.
    sinks: tuple[str, ...] = ()


class Notifier(abc.ABC):
    """One destination of the volume alert.

    `sink` names it in log events (`volume.<sink>_…`) and in the delivery failure counter's label.
    A notifier whose `redelivers` is True keeps each notice pending in the alert row until `notify`
    returned True for it; a later check announces it again (`redelivery`) once `worst_case_seconds`
    (how long `notify` can take before giving up) have certainly passed.
    """

    sink: str
    redelivers: bool = False
    worst_case_seconds: float = 0.0

    @abc.abstractmethod
    def notify(self, notification: Notification | None, context: CheckContext) -> bool:
        """Tell the destination what it should hear of this check; never raises.

        `notification` is the notice this worker won the right to announce (None on most checks).
        True when the destination took what it was sent, or nothing was to be sent.
        """


class LogNotifier(Notifier):
    """The structlog event of every notice (`volume.alert_firing`, `_reminder`, `_resolved`, `_redelivery`):
    always configured, so a notice is on record even where no other destination is."""

    sink = "log"

    def notify(self, notification: Notification | None, context: CheckContext) -> bool:
        if notification is None:
            return True
        state = notification.state
        emit = log.info if state.level is Level.OK else log.warning
        emit(notification.event, level=state.level.value, previous_level=state.previous_level.value,
             reason=state.reason, since=iso(state.since),
             **{f"used_{r}_ratio": round(v, 4) for r, v in context.usage.ratios().items()},
             projection=context.projection.status, full_in=describe_seconds(context.projection.seconds_to_full),
             sweep=context.sweep_note, webhook=WebhookNotifier.sink in context.sinks,
             alertmanagers=context.sinks.count(AlertmanagerNotifier.sink))
        return True


class WebhookNotifier(Notifier):
    """The generic webhook: one POST per change of level, reminder and recovery, in Alertmanager's
    webhook-receiver shape. A notice it could not deliver is re-sent by a later check."""

    sink = "webhook"
    redelivers = True

    def __init__(self, url: str, *, timeout: float, attempts: int, backoff: float = RETRY_BACKOFF_SECONDS):
        self.http = HttpSink(url, sink=self.sink, timeout=timeout, attempts=attempts, backoff=backoff)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def worst_case_seconds(self) -> float:  # type: ignore[override]
        return self.http.worst_case_seconds

    def notify(self, notification: Notification | None, context: CheckContext) -> bool:
        if notification is None:
            return True
        payload = alertmanager_payload(notification, context.usage, context.projection, thresholds=context.thresholds,
                                       storage_url=context.storage_url, sweep_note=context.sweep_note)
        return self.http.send(payload, alert_status=payload["status"])


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


class AlertmanagerNotifier(Notifier):
    """One Alertmanager, spoken to the way Prometheus does: at every check the fleet's alert as it stands
    is posted to `/api/v2/alerts` (a JSON array of postable alerts), firing with `endsAt` a few check
    intervals ahead, and after a recovery resolved for as long again. Alertmanager dedupes by labels, so
    re-posts and posts from several workers make one alert, and a failed post is simply repeated by the
    next check: nothing is kept pending."""

    sink = "alertmanager"

    def __init__(self, url: str, *, timeout: float, attempts: int, check_interval: timedelta,
                 generator_url: str | None = None, backoff: float = RETRY_BACKOFF_SECONDS):
        """`url`: the Alertmanager's base URL, or its alert API's; `generator_url`: the link on each alert
        to where it came from (the worker's /metrics)."""
        self.http = HttpSink(alertmanager_api_url(url), sink=self.sink, timeout=timeout, attempts=attempts,
                             backoff=backoff)
        self.ends_in = ENDS_AT_CHECK_INTERVALS * check_interval
        self.generator_url = generator_url

    @property
    def url(self) -> str:
        return self.http.url

    def notify(self, notification: Notification | None, context: CheckContext) -> bool:
        state = context.state
        alerts = postable_alerts(state, context.now, context.usage, context.projection, thresholds=context.thresholds,
                                 storage_url=context.storage_url, ends_in=self.ends_in, sweep_note=context.sweep_note,
                                 generator_url=self.generator_url)
        if not alerts:
            return True
        return self.http.send(alerts, alert_status="resolved" if state.level is Level.OK else "firing")


# Webhook URLs already told (in this process) that they name an Alertmanager: said once, not per check.
_advised: set[str] = set()


def configured_notifiers(*, alertmanager_urls: Sequence[str], webhook_url: str | None, timeout: float, attempts: int,
                         check_interval: timedelta, metrics_port: int) -> list[Notifier]:
    """The log, the generic webhook (if any) and one notifier per Alertmanager, in the order a check calls them.

    A webhook URL whose path is `/api/v2/alerts` evidently means an Alertmanager, which refuses the
    webhook shape (HTTP 400): it is spoken to in Alertmanager's own API instead, and the log says
    once that MEDIA_RETENTION_ALERTMANAGER_URL is the setting for it.
    """
    alertmanagers = [alertmanager_api_url(url) for url in alertmanager_urls]
    notifiers: list[Notifier] = [LogNotifier()]
    if webhook_url and is_alertmanager_api(webhook_url):
        if webhook_url not in alertmanagers:
            alertmanagers.append(webhook_url)
        if webhook_url not in _advised:
            _advised.add(webhook_url)
            log.warning("volume.webhook_is_alertmanager", target=url_origin(webhook_url),
                        hint="MEDIA_RETENTION_ALERT_WEBHOOK_URL names Alertmanager's alert API; alerts are posted "
                             "there in that API's format. Set MEDIA_RETENTION_ALERTMANAGER_URL to the "
                             "Alertmanager's base URL instead.")
    elif webhook_url:
        notifiers.append(WebhookNotifier(webhook_url, timeout=timeout, attempts=attempts))
    # The /metrics this worker serves the volume gauges on: Alertmanager links it as the alert's source.
    generator_url = f"http://{socket.gethostname()}:{metrics_port}/metrics" if metrics_port else None
    notifiers += [AlertmanagerNotifier(url, timeout=timeout, attempts=attempts, check_interval=check_interval,
                                       generator_url=generator_url) for url in alertmanagers]
    return notifiers
