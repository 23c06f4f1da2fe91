"""What a volume alert says, in the two shapes Alertmanager speaks: the webhook-receiver payload
(`alertmanager_payload`, for the generic webhook) and postable alerts (`postable_alerts`, for
Alertmanager's own `POST /api/v2/alerts`).

Pure functions of the alert state and the check's measurements, so every field is tested without
a server; the notifiers post what these return.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from worker.volume.levels import Level, Projection, Thresholds, Usage, describe_seconds
from worker.volume.state import VOLUME, AlertState, Notification, iso

ALERT_NAME = "MediaVolumeFilling"
RECEIVER = "media-retention"
# The version of Alertmanager's webhook payload whose shape this follows.
PAYLOAD_VERSION = "4"
# Alertmanager's endsAt for an alert that is still firing (Go's zero time).
OPEN_ENDS_AT = "0001-01-01T00:00:00Z"


def _labels(level: Level) -> dict[str, str]:
    return {"alertname": ALERT_NAME, "severity": level.value, "service": "media-retention", "volume": VOLUME}


def _fingerprint(labels: dict[str, str]) -> str:
    # Alertmanager identifies an alert by a 16-hex-digit hash of its sorted labels; any stable hash will do.
    canonical = "\x00".join(f"{name}\x00{value}" for name, value in sorted(labels.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _usage_annotations(usage: Usage, projection: Projection, storage_url: str) -> dict[str, str]:
    annotations = {"storage": storage_url, "projection": projection.status}
    for resource, ratio in usage.ratios().items():
        annotations[f"used_{resource}_ratio"] = f"{ratio:.4f}"
    if projection.seconds_to_full is not None:
        annotations["projected_full_in"] = describe_seconds(projection.seconds_to_full)
        annotations["projected_full_in_seconds"] = str(round(projection.seconds_to_full))
    return annotations


def _describe_usage(usage: Usage) -> str:
    parts = [f"{resource} {ratio:.1%} used ({usage.used(resource)} of {usage.total(resource)})"
             for resource, ratio in usage.ratios().items()]
    return ", ".join(parts)


def _resolved_alert(state: AlertState, usage: Usage, common: dict[str, str]) -> dict:
    """The level that `state` replaced, ended when `state` began."""
    labels = _labels(state.previous_level)
    return {
        "labels": labels,
        "annotations": {**common, "summary": f"Media volume no longer {state.previous_level.value}: "
                                             f"{_describe_usage(usage)}."},
        "startsAt": iso(state.previous_since),
        "endsAt": iso(state.since),
    }


def _firing_alert(state: AlertState, usage: Usage, projection: Projection, thresholds: Thresholds,
                  common: dict[str, str], sweep_note: str | None) -> dict:
    """The raised level of `state`, without its endsAt (which each sink sets its own way)."""
    threshold = thresholds.critical if state.level is Level.CRITICAL else thresholds.warn
    if state.reason == "projection":
        summary = f"Media volume projected full in {describe_seconds(projection.seconds_to_full)}."
    else:
        summary = f"Media volume {state.level.value}: {state.reason} at or above {threshold:.0%}."
    description = f"{_describe_usage(usage)}; projection {projection.status}"
    if projection.seconds_to_full is not None:
        description += f", full in {describe_seconds(projection.seconds_to_full)} at the recent rate"
    annotations = {**common, "summary": summary, "description": description + "."}
    if sweep_note:
        annotations["sweep"] = sweep_note
    return {"labels": _labels(state.level), "annotations": annotations, "startsAt": iso(state.since)}


def alertmanager_payload(notification: Notification, usage: Usage, projection: Projection, *, thresholds: Thresholds,
                         storage_url: str, sweep_note: str | None = None) -> dict:
    """The notice in Alertmanager's webhook shape, so any Alertmanager receiver can take it as it is.

    A change between two raised levels carries two alerts: the old level resolved, the new one firing.
    """
    state = notification.state
    common = _usage_annotations(usage, projection, storage_url)
    alerts = []
    if notification.kind != "reminder" and state.previous_level is not Level.OK and state.previous_since is not None:
        resolved = _resolved_alert(state, usage, common)
        alerts.append({"status": "resolved", **resolved, "generatorURL": "",
                       "fingerprint": _fingerprint(resolved["labels"])})
    if state.level is not Level.OK:
        firing = _firing_alert(state, usage, projection, thresholds, common, sweep_note)
        alerts.append({"status": "firing", **firing, "endsAt": OPEN_ENDS_AT, "generatorURL": "",
                       "fingerprint": _fingerprint(firing["labels"])})
    group_labels = {"alertname": ALERT_NAME, "volume": VOLUME}
    common_labels = dict(set.intersection(*(set(a["labels"].items()) for a in alerts))) if alerts else {}
    common_annotations = dict(set.intersection(*(set(a["annotations"].items()) for a in alerts))) if alerts else {}
    return {
        "version": PAYLOAD_VERSION,
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group_labels.items()) + "}",
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": RECEIVER,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": common_annotations,
        "externalURL": "",
        "alerts": alerts,
    }


def postable_alerts(state: AlertState, now: datetime, usage: Usage, projection: Projection, *, thresholds: Thresholds,
                    storage_url: str, ends_in: timedelta, sweep_note: str | None = None,
                    generator_url: str | None = None) -> list[dict]:
    """What Alertmanager's `POST /api/v2/alerts` should hear from this check: the fleet's alert as it is now.

    A raised level is firing until `now + ends_in`; the level a change replaced is resolved (its endsAt
    the moment it cleared) for `ends_in` after the change, as long as a firing post may still be alive.
    An empty list when there is nothing to say.
    """
    common = _usage_annotations(usage, projection, storage_url)
    alerts = []
    recent_change = state.since is not None and now - state.since < ends_in
    if (recent_change and state.previous_level is not Level.OK and state.previous_level is not state.level
            and state.previous_since is not None):
        alerts.append(_resolved_alert(state, usage, common))
    if state.level is not Level.OK:
        firing = _firing_alert(state, usage, projection, thresholds, common, sweep_note)
        alerts.append({**firing, "endsAt": iso(now + ends_in)})
    if generator_url:
        for alert in alerts:
            alert["generatorURL"] = generator_url
    return alerts
