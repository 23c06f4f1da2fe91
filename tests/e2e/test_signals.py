"""What operators watch, from a real `celery worker`: the series its /metrics exports before any volume
check or sweep, fed to promtool against deploy/prometheus/alerts.yml, and the task events `celery events`
and Flower read from the broker."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.deploy_files import RULES, alert_rules
from tests.fleet import wait_until
from tests.tools import require_tool

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow,
              pytest.mark.parametrize("database", ["postgresql"], indirect=True)]

CLI = Path(sys.executable).with_name("media-retention")
TARGET = {"job": "media-retention", "instance": "w1:9808"}


def _scrape(port: int) -> str | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None


def _is_time(name: str) -> bool:
    """A sample whose value is a Unix time (moved onto promtool's clock), by Prometheus' naming rules."""
    return name.endswith(("_timestamp_seconds", "_time_seconds"))


def promtool_series(body: str, origin: float, minutes: int) -> list[dict]:
    """The scrape as promtool input series, held for `minutes` (a worker that checks nothing keeps exporting
    the same series), with the target labels Prometheus adds and Unix times counted from `origin`."""
    series = []
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.endswith("_created") or math.isnan(sample.value):
                continue
            value = sample.value - origin if _is_time(sample.name) else sample.value
            labels = ", ".join(f"{name}={json.dumps(text)}" for name, text in {**sample.labels, **TARGET}.items())
            written = "Inf" if math.isinf(value) else repr(value)
            series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{written}x{minutes}"})
    return series


def test_a_worker_that_never_checked_or_swept_raises_the_stale_alerts_after_half_an_hour_and_nothing_when_fresh(
        fleet, tmp_path):
    """A real worker without beat exports no check time and no last sweep. Its own series, fed to promtool
    on a clock that starts with the worker: nothing fires 10 minutes in; 45 minutes in MediaVolumeCheckStale
    and MediaSweepsStopped fire, and nothing else."""
    promtool = require_tool("promtool")
    port = free_port()
    fleet.env["MEDIA_RETENTION_METRICS_PORT"] = str(port)
    fleet.worker("w1")
    body = wait_until(lambda: (text := _scrape(port)) and "media_retention_catalog_up 1.0" in text and text, 60,
                      "the worker's /metrics with the catalog up")
    names = {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}
    assert "media_retention_volume_last_sample_timestamp_seconds" not in names
    assert "media_retention_last_sweep_finished_timestamp_seconds" not in names
    started = next(sample.value for family in text_string_to_metric_families(body) for sample in family.samples
                   if sample.name == "process_start_time_seconds")

    alerts = [rule["alert"] for rule in alert_rules()]
    firing_late = {
        "MediaVolumeCheckStale": [{"exp_labels": {"job": TARGET["job"], "severity": "warning", "volume": "media"},
                                   "exp_annotations": {
                                       "summary": "No media volume check for 45m 0s.",
                                       "description": "The volume check (beat entry check-media-volume, every "
                                                      "MEDIA_RETENTION_VOLUME_CHECK_INTERVAL) has not run for 30 minutes: "
                                                      "is beat running, and are workers consuming?"}}],
        "MediaSweepsStopped": [{"exp_labels": {"job": TARGET["job"], "severity": "critical"},
                                "exp_annotations": {
                                    "summary": "No sweep has finished for 45m 0s.",
                                    "description": "Scheduled sweeps stopped finishing: beat is down, no worker consumes "
                                                   "the queue, or sweeps crash. Check `media-retention status` and the "
                                                   "beat and worker logs."}}],
    }
    checks = [{"eval_time": "10m", "alertname": name, "exp_alerts": []} for name in sorted(set(alerts))]
    checks += [{"eval_time": "45m", "alertname": name, "exp_alerts": firing_late.get(name, [])} for name in sorted(set(alerts))]
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": promtool_series(body, started, 60), "alert_rule_test": checks}]}
    path = tmp_path / "real-worker-tests.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    tested = subprocess.run([promtool, "test", "rules", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_worker_sends_task_events_that_celery_events_receives_for_a_sweep_sent_from_the_command_line(
        fleet, private_redis):
    """With the shipped settings on Redis, an event receiver on the broker (what `celery events` and Flower
    are) sees a sweep sent by `media-retention sweep --enqueue` as sent, received, started and succeeded."""
    fleet.worker("w1")
    receiver_app = Celery(broker=private_redis.url)
    events: list[dict] = []
    stop = threading.Event()

    def listen() -> None:
        with receiver_app.connection() as connection:
            receiver = receiver_app.events.Receiver(connection, handlers={"*": events.append})
            receiver.should_stop = False
            threading.Thread(target=lambda: (stop.wait(), setattr(receiver, "should_stop", True)), daemon=True).start()
            receiver.capture(limit=None, timeout=None, wakeup=True)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        wait_until(lambda: any(event["type"] == "worker-heartbeat" for event in events), 60,
                   "the worker's first heartbeat on the event exchange")
        sent = subprocess.run([str(CLI), "sweep", "--enqueue", "--json"], check=False, env=fleet.env, capture_output=True,
                              text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr

        def task_events() -> set[str] | None:
            ids = {event["uuid"] for event in events if event["type"] == "task-sent" and event["name"] == "media_retention.sweep"}
            kinds = {event["type"] for event in events if event.get("uuid") in ids}
            return kinds if {"task-sent", "task-received", "task-started", "task-succeeded"} <= kinds else None

        wait_until(task_events, 60, "the sweep's task events")
    finally:
        stop.set()
        listener.join(timeout=10)
