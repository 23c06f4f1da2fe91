"""Volume levels, hysteresis, projection and alert decisions as pure functions; the rules file; the settings."""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from config.schedule import VOLUME_TASK, beat_schedule
from config.settings import load_settings
from worker import metrics
from config.errors import BadInput
from worker.exporter import FLEET_STATUS_METRICS
from worker.http.app import create_app
from worker.volume import (
    Evaluation,
    Level,
    Projection,
    Thresholds,
    Usage,
    describe_seconds,
    evaluate,
    filesystem_usage,
    fit_line,
    project,
    time_to_full,
)
from worker.volume.http import _redact, url_origin
from worker.volume.notifiers import WebhookNotifier, alertmanager_api_url
from worker.volume.payloads import OPEN_ENDS_AT, alertmanager_payload, postable_alerts
from worker.volume.state import AlertState, Notification, decide

OK, WARNING, CRITICAL = Level.OK, Level.WARNING, Level.CRITICAL
THRESHOLDS = Thresholds(warn=0.80, critical=0.90, hysteresis=0.05, horizon_seconds=86400)
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def usage(bytes_ratio: float | None, inodes_ratio: float | None = None) -> Usage:
    return Usage(used_bytes=round((bytes_ratio or 0) * 1000), total_bytes=1000 if bytes_ratio is not None else None,
                 used_inodes=None if inodes_ratio is None else round(inodes_ratio * 1000),
                 total_inodes=None if inodes_ratio is None else 1000)


def eta(seconds: float | None) -> Projection:
    return Projection("filling", seconds) if seconds is not None else Projection("not_filling")


# -- levels and hysteresis -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bytes_ratio", "inodes_ratio", "previous", "full_in", "level", "reason"),
    [
        (0.50, None, OK, None, OK, None),
        (0.799, None, OK, None, OK, None),
        (0.80, None, OK, None, WARNING, "bytes"),
        (0.899, None, OK, None, WARNING, "bytes"),
        (0.90, None, OK, None, CRITICAL, "bytes"),
        (1.00, None, OK, None, CRITICAL, "bytes"),
        (0.10, 0.85, OK, None, WARNING, "inodes"),
        (0.10, 0.93, OK, None, CRITICAL, "inodes"),
        (0.95, 0.85, OK, None, CRITICAL, "bytes"),
        (None, 0.91, OK, None, CRITICAL, "inodes"),
        # hysteresis: a raised level holds until 5 points below its threshold
        (0.76, None, WARNING, None, WARNING, "bytes"),
        (0.75, None, WARNING, None, WARNING, "bytes"),
        (0.749, None, WARNING, None, OK, None),
        (0.86, None, CRITICAL, None, CRITICAL, "bytes"),
        (0.849, None, CRITICAL, None, WARNING, "bytes"),
        (0.76, None, CRITICAL, None, WARNING, "bytes"),
        (0.70, None, CRITICAL, None, OK, None),
        (0.89, None, WARNING, None, WARNING, "bytes"),
        # projection: a warning below the threshold when full within the horizon (24 h)
        (0.50, None, OK, 3600, WARNING, "projection"),
        (0.50, None, OK, 86400, WARNING, "projection"),
        (0.50, None, OK, 86401, OK, None),
        (0.85, None, OK, 3600, WARNING, "bytes"),
        (0.95, None, OK, 60, CRITICAL, "bytes"),
        # ... which clears only once the volume is projected to last two horizons
        (0.50, None, WARNING, 150000, WARNING, "projection"),
        (0.50, None, WARNING, 172801, OK, None),
        (0.50, None, WARNING, None, OK, None),
    ],
)
def test_levels_follow_thresholds_projection_and_hysteresis(bytes_ratio, inodes_ratio, previous, full_in, level, reason):
    """The fullest resource sets the level; raised levels clear only below threshold minus hysteresis."""
    evaluation = evaluate(usage(bytes_ratio, inodes_ratio), eta(full_in), previous, THRESHOLDS)
    assert (evaluation.level, evaluation.reason) == (level, reason)


def test_a_value_flapping_around_the_threshold_notifies_once_until_it_clears_below_the_margin():
    """0.79/0.81/0.79/0.81/0.76 is one warning; 0.74 resolves it: two notices in all."""
    state, notices = AlertState(since=T0), []
    for minute, ratio in enumerate([0.79, 0.81, 0.79, 0.81, 0.79, 0.76, 0.74, 0.79]):
        now = T0 + timedelta(minutes=5 * minute)
        evaluation = evaluate(usage(ratio), Projection("not_filling"), state.level, THRESHOLDS)
        state, notice = decide(state, evaluation, now, reminder=timedelta(hours=4), redeliver_after=timedelta(seconds=30),
                               webhook=False)
        if notice:
            notices.append((ratio, notice.kind))
    assert notices == [(0.81, "firing"), (0.74, "resolved")]


def test_evaluating_a_sample_without_any_known_total_is_refused():
    """An object store without a capacity has no ratio; evaluate says so instead of guessing."""
    with pytest.raises(ValueError):
        evaluate(Usage(used_bytes=5, total_bytes=None), Projection("insufficient_data"), OK, THRESHOLDS)


# -- projection ----------------------------------------------------------------------------------


def series(values: list[float], step: float = 300.0) -> list[tuple[float, float]]:
    return [(i * step, value) for i, value in enumerate(values)]


@pytest.mark.parametrize(
    ("points", "capacity", "status", "seconds"),
    [
        ([], 1000, "insufficient_data", None),
        (series([100, 200]), 1000, "insufficient_data", None),
        (series([100, 200, 300], step=60), 1000, "insufficient_data", None),  # spans 2 min < 10 min
        (series([500, 500, 500, 500]), 1000, "not_filling", None),
        (series([600, 550, 500, 450]), 1000, "not_filling", None),
        # +100 every 300 s, last at 400: 600 more at 1/3 per second
        (series([100, 200, 300, 400]), 1000, "filling", 1800.0),
        # noisy around the same line: the least-squares fit still finds it
        (series([110, 190, 310, 390]), 1000, "filling", pytest.approx(1800.0, rel=0.1)),
        (series([700, 900, 1100]), 1000, "full", 0.0),
    ],
)
def test_time_to_full_is_a_least_squares_extrapolation_with_enough_samples(points, capacity, status, seconds):
    """Like predict_linear: a fitted slope, from at least 3 samples over at least 10 minutes."""
    projection = time_to_full(points, capacity)
    assert projection.status == status
    assert projection.seconds_to_full == seconds


@pytest.mark.parametrize(
    ("points", "slope", "fitted_last"),
    [
        ([(0, 0), (10, 10)], 1.0, 10.0),
        ([(0, 5), (1, 5), (2, 5)], 0.0, 5.0),
        ([(0, 1), (1, 3), (2, 2)], 0.5, 2.5),
        ([(1e5, 1e13), (1e5 + 300, 1e13 + 3e6), (1e5 + 600, 1e13 + 6e6)], 1e4, 1e13 + 6e6),
    ],
)
def test_fit_line_returns_the_least_squares_slope_and_the_value_fitted_at_the_last_point(points, slope, fitted_last):
    """Centred sums keep the fit exact even for byte counts near 1e13."""
    fitted = fit_line(points)
    assert fitted == (pytest.approx(slope), pytest.approx(fitted_last))


def test_the_projection_takes_the_resource_that_fills_first_against_the_newest_total():
    """Inodes running out before bytes are what the projection reports."""
    samples = [
        Usage(used_bytes=100 + 10 * i, total_bytes=1000, used_inodes=500 + 100 * i, total_inodes=1000,
              taken_at=T0 + timedelta(minutes=5 * i))
        for i in range(4)
    ]
    projection = project(samples)
    assert (projection.status, projection.resource) == ("filling", "inodes")
    assert projection.seconds_to_full == pytest.approx((1000 - 800) / (100 / 300))


def test_a_shrinking_volume_is_reported_as_not_filling():
    """Deletions outpacing uploads mean no time to full at all."""
    samples = [Usage(used_bytes=900 - 50 * i, total_bytes=1000, taken_at=T0 + timedelta(minutes=5 * i)) for i in range(4)]
    assert project(samples).status == "not_filling"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, None), (0, "now"), (-5, "now"), (42, "42s"), (60, "1m"), (3600, "1h"), (3 * 3600 + 720, "3h 12m"),
     (86400, "1d"), (2 * 86400 + 4 * 3600 + 59, "2d 4h")],
)
def test_times_to_full_read_as_people_say_them(seconds, text):
    """Annotations and the CLI say `3h 12m`, not a number of seconds."""
    assert describe_seconds(seconds) == text


def test_filesystem_usage_counts_bytes_like_df(tmp_path):
    """Used is blocks minus free; the total is used plus what unprivileged users may still write."""
    measured = filesystem_usage(tmp_path)
    disk = shutil.disk_usage(tmp_path)
    assert measured.used_bytes == pytest.approx(disk.used, abs=64 * 1024 * 1024)
    assert measured.total_bytes == pytest.approx(disk.used + disk.free, abs=64 * 1024 * 1024)
    assert 0 < measured.ratio("bytes") < 1


# -- alert decisions -----------------------------------------------------------------------------


def ev(level: Level, reason: str | None = "bytes") -> Evaluation:
    return Evaluation(level, None if level is OK else reason, 0.5)


REMINDER, REDELIVER = timedelta(hours=4), timedelta(seconds=30)


@pytest.mark.parametrize(
    ("state", "level", "minutes_later", "webhook", "kind"),
    [
        (AlertState(), OK, 0, True, None),
        (AlertState(), WARNING, 0, True, "firing"),
        (AlertState(), CRITICAL, 0, False, "firing"),
        (AlertState(level=WARNING, since=T0, notified_at=T0), CRITICAL, 1, True, "firing"),
        (AlertState(level=CRITICAL, since=T0, notified_at=T0), WARNING, 1, True, "firing"),
        (AlertState(level=WARNING, since=T0, notified_at=T0), OK, 1, True, "resolved"),
        (AlertState(level=WARNING, since=T0, notified_at=T0), WARNING, 239, True, None),
        (AlertState(level=WARNING, since=T0, notified_at=T0), WARNING, 240, True, "reminder"),
        (AlertState(level=OK, since=T0, notified_at=T0), OK, 10_000, True, None),
        # a notice whose webhook delivery is pending is re-sent once its sender has certainly given up
        (AlertState(level=WARNING, since=T0, notified_at=T0, delivery_pending=True), WARNING, 0.4, True, None),
        (AlertState(level=WARNING, since=T0, notified_at=T0, delivery_pending=True), WARNING, 1, True, "redelivery"),
        (AlertState(level=OK, since=T0, notified_at=T0, delivery_pending=True), OK, 1, True, "redelivery"),
        (AlertState(level=OK, since=T0, notified_at=T0, delivery_pending=True), OK, 1, False, None),
    ],
)
def test_decisions_announce_changes_once_remind_on_an_interval_and_resend_pending_deliveries(
        state, level, minutes_later, webhook, kind):
    """Each change is one notice; an unchanged raised level is re-announced only every reminder interval."""
    now = T0 + timedelta(minutes=minutes_later)
    new, notice = decide(state, ev(level), now, reminder=REMINDER, redeliver_after=REDELIVER, webhook=webhook)
    assert (notice.kind if notice else None) == kind
    if notice is None:
        assert new == state
    else:
        assert new.notified_at == now and new.delivery_pending == webhook and new.version == state.version
    if kind in ("firing", "resolved"):
        assert (new.level, new.since, new.previous_level, new.previous_since) == (level, now, state.level, state.since)


# -- the Alertmanager payload --------------------------------------------------------------------


def test_an_escalation_is_sent_as_the_warning_resolved_and_the_critical_firing_in_alertmanagers_shape():
    """Two alerts, each with labels, annotations, startsAt and endsAt; the group fields Alertmanager sends."""
    state = AlertState(level=CRITICAL, reason="inodes", since=T0 + timedelta(hours=1), previous_level=WARNING,
                       previous_since=T0, notified_at=T0 + timedelta(hours=1))
    sample = usage(0.40, 0.93)
    payload = alertmanager_payload(Notification("firing", state), sample, Projection("filling", 7200, "inodes"),
                                   thresholds=THRESHOLDS, storage_url="file:///mnt/media",
                                   sweep_note="an immediate sweep was enqueued (it deletes only expired media)")
    assert payload["version"] == "4" and payload["status"] == "firing" and payload["receiver"] == "media-retention"
    assert payload["groupKey"] == '{}:{alertname="MediaVolumeFilling", volume="media"}'
    assert payload["groupLabels"] == {"alertname": "MediaVolumeFilling", "volume": "media"}
    assert payload["commonLabels"] == {"alertname": "MediaVolumeFilling", "service": "media-retention", "volume": "media"}
    assert payload["truncatedAlerts"] == 0 and "externalURL" in payload
    resolved, firing = payload["alerts"]
    assert (resolved["status"], resolved["labels"]["severity"]) == ("resolved", "warning")
    assert (resolved["startsAt"], resolved["endsAt"]) == ("2026-11-01T12:00:00Z", "2026-11-01T13:00:00Z")
    assert (firing["status"], firing["labels"]["severity"]) == ("firing", "critical")
    assert (firing["startsAt"], firing["endsAt"]) == ("2026-11-01T13:00:00Z", OPEN_ENDS_AT)
    assert firing["annotations"]["sweep"].startswith("an immediate sweep was enqueued")
    assert firing["annotations"]["used_inodes_ratio"] == "0.9300"
    assert firing["annotations"]["projected_full_in"] == "2h"
    assert "inodes at or above 90%" in firing["annotations"]["summary"]
    assert resolved["fingerprint"] != firing["fingerprint"] and len(firing["fingerprint"]) == 16
    assert all(isinstance(value, str) for alert in payload["alerts"] for value in alert["annotations"].values())


def test_a_reminder_carries_only_the_firing_alert_and_a_recovery_only_the_resolved_one():
    """A reminder re-announces the raised level; a resolved notice closes it and fires nothing."""
    raised = AlertState(level=WARNING, reason="projection", since=T0, notified_at=T0)
    reminder = alertmanager_payload(Notification("reminder", raised), usage(0.5), Projection("filling", 3600, "bytes"),
                                    thresholds=THRESHOLDS, storage_url="file:///m")
    assert [a["status"] for a in reminder["alerts"]] == ["firing"]
    assert reminder["alerts"][0]["annotations"]["summary"] == "Media volume projected full in 1h."
    cleared = AlertState(level=OK, since=T0 + timedelta(hours=2), previous_level=WARNING, previous_since=T0)
    resolved = alertmanager_payload(Notification("resolved", cleared), usage(0.5), Projection("not_filling"),
                                    thresholds=THRESHOLDS, storage_url="file:///m")
    assert resolved["status"] == "resolved"
    assert [(a["status"], a["labels"]["severity"], a["endsAt"]) for a in resolved["alerts"]] == [
        ("resolved", "warning", "2026-11-01T14:00:00Z")]


# -- Alertmanager's API (postable alerts) ----------------------------------------------------------

ENDS_IN = timedelta(minutes=20)


def postable(state: AlertState, minutes_later: float) -> list[dict]:
    return postable_alerts(state, T0 + timedelta(minutes=minutes_later), usage(0.93), Projection("not_filling"),
                           thresholds=THRESHOLDS, storage_url="file:///m", ends_in=ENDS_IN)


def test_a_raised_level_is_posted_firing_with_ends_at_ahead_of_each_check():
    """Each check posts the one raised alert: startsAt when it was raised, endsAt `ends_in` after this check."""
    raised = AlertState(level=CRITICAL, reason="bytes", since=T0, notified_at=T0)
    for minutes in (0, 5, 300):
        [alert] = postable(raised, minutes)
        assert alert["labels"] == {"alertname": "MediaVolumeFilling", "severity": "critical",
                                   "service": "media-retention", "volume": "media"}
        assert alert["startsAt"] == "2026-11-01T12:00:00Z"
        assert alert["endsAt"] == (T0 + timedelta(minutes=minutes) + ENDS_IN).isoformat().replace("+00:00", "Z")
        assert "status" not in alert and "fingerprint" not in alert and "generatorURL" not in alert
        assert alert["annotations"]["summary"] == "Media volume critical: bytes at or above 90%."


def test_a_recovery_is_posted_resolved_at_the_moment_it_cleared_until_a_firing_post_could_have_expired():
    """After warning -> ok the warning is re-posted with endsAt = the recovery for `ends_in`, then nothing."""
    cleared = AlertState(level=OK, since=T0 + timedelta(hours=2), previous_level=WARNING, previous_since=T0)
    for minutes in (120, 125, 139):
        [alert] = postable(cleared, minutes)
        assert alert["labels"]["severity"] == "warning"
        assert (alert["startsAt"], alert["endsAt"]) == ("2026-11-01T12:00:00Z", "2026-11-01T14:00:00Z")
    assert postable(cleared, 140) == [] and postable(AlertState(), 0) == []


def test_an_escalation_is_posted_as_the_old_level_resolved_and_the_new_one_firing():
    """warning -> critical: the warning ends when critical begins; later checks post critical alone."""
    escalated = AlertState(level=CRITICAL, reason="inodes", since=T0 + timedelta(hours=1), previous_level=WARNING,
                           previous_since=T0)
    resolved, firing = postable(escalated, 61)
    assert (resolved["labels"]["severity"], resolved["endsAt"]) == ("warning", "2026-11-01T13:00:00Z")
    assert (firing["labels"]["severity"], firing["startsAt"]) == ("critical", "2026-11-01T13:00:00Z")
    assert [alert["labels"]["severity"] for alert in postable(escalated, 90)] == ["critical"]


def test_a_generator_url_is_set_on_every_posted_alert_when_given():
    """The alert's source link (the worker's /metrics) goes on each alert, resolved ones too."""
    escalated = AlertState(level=CRITICAL, reason="bytes", since=T0, previous_level=WARNING, previous_since=T0 - timedelta(hours=1))
    alerts = postable_alerts(escalated, T0, usage(0.95), Projection("not_filling"), thresholds=THRESHOLDS,
                             storage_url="file:///m", ends_in=ENDS_IN, generator_url="http://worker-1:9808/metrics")
    assert [alert["generatorURL"] for alert in alerts] == ["http://worker-1:9808/metrics"] * 2


@pytest.mark.parametrize(
    ("base", "api"),
    [
        ("http://alertmanager:9093", "http://alertmanager:9093/api/v2/alerts"),
        ("http://alertmanager:9093/", "http://alertmanager:9093/api/v2/alerts"),
        ("https://ops.example/alertmanager", "https://ops.example/alertmanager/api/v2/alerts"),
        ("https://ops.example/am?tenant=t1", "https://ops.example/am/api/v2/alerts?tenant=t1"),
        ("http://alertmanager:9093/api/v2/alerts", "http://alertmanager:9093/api/v2/alerts"),
    ],
)
def test_an_alertmanager_base_url_becomes_its_alert_api(base, api):
    """The API path goes after any route prefix and before any query; a URL naming the API is kept."""
    assert alertmanager_api_url(base) == api


def test_only_a_urls_scheme_and_host_survive_into_logs():
    """User, password, path and query are dropped from what is logged, and cut out of error messages."""
    url = "https://bot:pa55@hooks.example:8443/services/T0K3N/alerts?key=s3cret"
    assert url_origin(url) == "https://hooks.example:8443"
    message = ("HTTPSConnectionPool(host='hooks.example', port=8443): Max retries exceeded with url: "
               "/services/T0K3N/alerts?key=s3cret (Caused by NewConnectionError('refused'))")
    redacted = _redact(message, url)
    assert "T0K3N" not in redacted and "s3cret" not in redacted and "pa55" not in redacted
    assert redacted.startswith("HTTPSConnectionPool(host='hooks.example', port=8443)")


def test_the_webhook_worst_case_is_attempts_times_timeout_plus_the_pauses():
    """3 attempts of 5 s with 1 s then 2 s between them: 18 s at most against a hung endpoint."""
    assert WebhookNotifier("http://x/", timeout=5, attempts=3).worst_case_seconds == 18
    assert WebhookNotifier("http://x/", timeout=1, attempts=1, backoff=0.5).worst_case_seconds == 1


# -- settings, schedule, rules file --------------------------------------------------------------


def test_volume_settings_have_documented_defaults(tmp_path):
    """5-minute checks, a 6 h window, a 24 h horizon, 5 points of hysteresis, 4 h reminders, 3 x 5 s webhook."""
    settings = load_settings(data_dir=tmp_path)
    assert (settings.volume_warn, settings.volume_critical, settings.volume_hysteresis) == (0.80, 0.90, 0.05)
    assert settings.volume_check_interval == timedelta(minutes=5)
    assert (settings.volume_projection_window, settings.volume_projection_horizon) == (timedelta(hours=6), timedelta(days=1))
    assert settings.volume_alert_reminder == timedelta(hours=4)
    assert (settings.alert_webhook_timeout, settings.alert_webhook_attempts) == (timedelta(seconds=5), 3)
    assert settings.s3_capacity_bytes is None


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"volume_hysteresis": 0.8}, "VOLUME_HYSTERESIS"),
        ({"alert_webhook_url": "ftp://alerts"}, "ALERT_WEBHOOK_URL"),
        ({"alertmanager_url": "http://am-1:9093,alertmanager:9093"}, "ALERTMANAGER_URL"),
        ({"alertmanager_url": "https://"}, "ALERTMANAGER_URL"),
        ({"alert_webhook_timeout": "5m"}, "ALERT_WEBHOOK_TIMEOUT"),
        ({"alert_webhook_attempts": 0}, "ALERT_WEBHOOK_ATTEMPTS"),
        ({"s3_capacity_bytes": 0}, "S3_CAPACITY_BYTES"),
        ({"volume_check_interval": "soon"}, "VOLUME_CHECK_INTERVAL"),
    ],
)
def test_bad_volume_settings_are_refused_naming_the_variable(tmp_path, overrides, variable):
    """A hysteresis as large as the warning, a non-HTTP webhook or a zero capacity stops with one sentence."""
    with pytest.raises(BadInput, match=variable):
        load_settings(data_dir=tmp_path, **overrides)


def test_beat_checks_the_volume_on_its_own_interval(tmp_path):
    """The schedule names the volume task by string, every MEDIA_RETENTION_VOLUME_CHECK_INTERVAL."""
    entry = beat_schedule(load_settings(data_dir=tmp_path, volume_check_interval="2m"))["check-media-volume"]
    assert entry == {"task": VOLUME_TASK, "schedule": 120.0, "options": {"expires": 120.0}}


def _exported_metric_names() -> set[str]:
    """Names in worker/metrics.py, the exporter's fleet-status gauges and the lookup service's metrics
    (tests/field checks a real scrape too)."""
    names = set(FLEET_STATUS_METRICS)
    for value in vars(metrics).values():
        if hasattr(value, "collect") and hasattr(value, "_name"):
            for family in value.collect():
                names.add(family.name)
                names.update(sample.name for sample in family.samples)
            names.add(value._name + ("_total" if value._type == "counter" else ""))
    # The lookup service's own registry (`media-retention serve`'s /metrics).
    app = create_app(lookups=None, ping=lambda: None)
    app.build_middleware_stack()  # the request metrics live in the middleware, built with the first request
    for family in app.state.metrics_registry.collect():
        names.add(family.name)
        names.update({"counter": [family.name + "_total"],
                      "histogram": [family.name + suffix for suffix in ("_bucket", "_count", "_sum")]}.get(family.type, []))
    return names


def test_the_prometheus_rules_parse_and_name_only_metrics_the_workers_export():
    """Every rule has an alert, an expression, a severity and a summary; its metrics exist in worker/metrics.py."""
    document = yaml.safe_load(RULES.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    exported = _exported_metric_names()
    assert len(rules) >= 4
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        named = set(re.findall(r"\bmedia_retention_[a-z_]+\b", rule["expr"]))
        assert named, f"{rule['alert']} names no metric of ours"
        assert named <= exported, f"{rule['alert']} names unknown metrics {named - exported}"
    severities = {(rule["alert"], rule["labels"]["severity"]) for rule in rules}
    assert {("MediaVolumeFilling", "warning"), ("MediaVolumeFilling", "critical")} <= severities
    identities = [(rule["alert"], tuple(sorted(rule["labels"].items()))) for rule in rules]
    assert len(identities) == len(set(identities)), "two rules with one alert name and the same labels merge in Alertmanager"


def test_a_volume_that_dropped_and_stayed_flat_is_not_projected_to_fill():
    """Six hours of growth, then space freed and usage flat for an hour, checked every 20 s: the fit over
    the whole window still rises, but the recent trend is flat, so no time to full (it used to say ~8 h)."""
    rising = [(i * 20.0, 300 + i * 0.5) for i in range(1080)]                  # 6 h: 300 -> 840 of 1000
    flat = [(21600.0 + i * 20.0, 500.0) for i in range(180)]                  # freed to 500, flat for 60 min
    window = [(x, y) for x, y in rising + flat if x >= flat[-1][0] - 6 * 3600]
    slope, fitted_now = fit_line(window)
    assert (1000 - fitted_now) / slope / 3600 == pytest.approx(8.2, abs=0.1), "the whole window's line says 8 h"
    assert time_to_full(window, 1000).status == "not_filling"


def test_a_volume_falling_now_is_not_projected_to_fill_however_it_grew_before():
    """Growth for most of the window, then usage falling for the last 20 minutes: not filling."""
    points = series([100, 200, 300, 400, 500, 600, 700, 800, 750, 700, 650, 600, 550])
    assert fit_line(points)[0] > 0
    assert time_to_full(points, 1000).status == "not_filling"


def test_a_volume_growing_steadily_is_still_projected_from_its_newest_sample():
    """The guard leaves steady growth alone: +1 a minute from 400 fills 1000 in 600 minutes."""
    points = [(i * 60.0, 400 + i) for i in range(361)]
    projection = time_to_full(points, 1360)
    assert projection.status == "filling"
    assert projection.seconds_to_full == pytest.approx(600 * 60)
