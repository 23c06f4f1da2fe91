"""Volume checks against the real filesystem, a real HTTP receiver and a SQLite catalog.

The alert state is a row in the catalog database changed by compare-and-set; these tests race
several workers (threads, each with its own engine, as separate processes would have) on SQLite;
tests/integration/test_volume.py does the same on PostgreSQL.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, update

from config.schedule import SWEEP_TASK
from config.settings import get_settings
from tests.factories import seed_items
from tests.receiver import Receiver
from tests.volume_support import (
    age_notification,
    alert_row,
    db_time,
    events,
    fixed,
    race,
    real_ratio,
    thresholds_above,
    thresholds_below,
    volume_settings,
)
from worker.engine import Engine, build, volume_monitor
from worker.cli import main
from worker.db import Database, db_now
from worker.models import MediaItem, Organization, State, VolumeAlert, VolumeSample
from worker.store import BlobStore
from worker.store.fs import FilesystemStore
from worker.volume import Usage, filesystem_usage
from worker.volume.monitor import VolumeMonitor
from worker.volume.notifiers import AlertmanagerNotifier, LogNotifier, WebhookNotifier


# -- the real filesystem and a real receiver -----------------------------------------------------


def test_thresholds_below_the_real_usage_raise_an_alert_and_thresholds_above_it_clear_it(tmp_path, sqlite_database, receiver):
    """statvfs of the media root against the settings: critical fires once (with a sweep), then resolves."""
    media = tmp_path / "media"
    media.mkdir()
    store = FilesystemStore(media, delete_threads=1)
    ratio = real_ratio(media)
    sweeps: list[float] = []
    raised = volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url, **thresholds_below(ratio))
    with structlog.testing.capture_logs() as logs:
        report = build(raised, database=sqlite_database, store=store).volume_monitor(enqueue_sweep=lambda: sweeps.append(1)).check()
    assert (report.evaluation.level.value, report.notification) == ("critical", "firing")
    assert sweeps == [1] and events(logs) == ["volume.alert_firing"]
    assert "volume.sweep_enqueued" in events(logs, "volume.sweep")
    assert report.usage.ratio("bytes") == pytest.approx(filesystem_usage(media).ratio("bytes"), abs=0.01)

    cleared = volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url, **thresholds_above(ratio))
    with structlog.testing.capture_logs() as logs:
        report = build(cleared, database=sqlite_database, store=store).volume_monitor().check()
    assert (report.evaluation.level.value, report.notification) == ("ok", "resolved")
    assert events(logs) == ["volume.alert_resolved"]

    firing, resolved = receiver.payloads()
    assert [post["path"] for post in receiver.posts] == ["/hooks/alertmanager?token=s3cret"] * 2
    assert {post["content_type"] for post in receiver.posts} == {"application/json"}
    assert (firing["version"], firing["status"], firing["receiver"]) == ("4", "firing", "media-retention")
    [alert] = firing["alerts"]
    assert alert["labels"] == {"alertname": "MediaVolumeFilling", "severity": "critical", "service": "media-retention",
                               "volume": "media"}
    assert alert["status"] == "firing" and alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["annotations"]["storage"] == media.resolve().as_uri()
    assert float(alert["annotations"]["used_bytes_ratio"]) == pytest.approx(report.usage.ratio("bytes"), abs=0.01)
    assert alert["annotations"]["sweep"] == "an immediate sweep was enqueued (it deletes only expired media)"
    assert resolved["status"] == "resolved"
    [closed] = resolved["alerts"]
    assert (closed["status"], closed["labels"]["severity"], closed["startsAt"]) == ("resolved", "critical", alert["startsAt"])
    assert closed["endsAt"] > closed["startsAt"]
    assert alert_row(sqlite_database).delivery_pending is False


def test_a_held_alert_is_reminded_on_the_interval_and_otherwise_stays_quiet(tmp_path, sqlite_database, receiver):
    """Checks while the level holds say nothing until the reminder interval has passed, then remind once."""
    settings = volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url, volume_alert_reminder="1h")
    monitor = volume_monitor(settings, sqlite_database, fixed(0.85))
    kinds = [monitor.check().notification for _ in range(3)]
    age_notification(sqlite_database, 3600)
    kinds += [monitor.check().notification, monitor.check().notification]
    assert kinds == ["firing", None, None, "reminder", None]
    assert [p["alerts"][0]["status"] for p in receiver.payloads()] == ["firing", "firing"]
    assert receiver.payloads()[0]["alerts"][0]["startsAt"] == receiver.payloads()[1]["alerts"][0]["startsAt"]


def test_a_steady_climb_below_the_threshold_warns_from_the_projection(tmp_path, sqlite_database, receiver):
    """Samples growing 1 point per 5 minutes from 50 % project a full volume within the horizon: warning."""
    now = db_time(sqlite_database)
    with sqlite_database.transaction() as session:
        session.execute(insert(VolumeSample), [
            {"taken_at": now - timedelta(seconds=300 * (6 - i)), "used_bytes": 500_000 + 10_000 * i,
             "total_bytes": 1_000_000} for i in range(6)
        ])
    settings = volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url)
    report = volume_monitor(settings, sqlite_database, fixed(0.56)).check()
    assert (report.evaluation.level.value, report.evaluation.reason) == ("warning", "projection")
    assert report.projection.status == "filling"
    assert report.projection.seconds_to_full == pytest.approx(44 * 300, rel=0.05)
    [alert] = receiver.payloads()[0]["alerts"]
    assert alert["annotations"]["summary"].startswith("Media volume projected full in")
    assert alert["annotations"]["projected_full_in"] in ("3h 39m", "3h 40m", "3h 41m")
    assert REGISTRY.get_sample_value("media_retention_volume_full_in_seconds") == pytest.approx(44 * 300, rel=0.05)


def test_samples_older_than_the_window_are_dropped(tmp_path, sqlite_database):
    """The samples table holds one projection window, however long the fleet runs."""
    now = db_time(sqlite_database)
    with sqlite_database.transaction() as session:
        session.execute(insert(VolumeSample), [
            {"taken_at": now - timedelta(hours=hours), "used_bytes": 1, "total_bytes": 10} for hours in (7, 5, 0.1)
        ])
    volume_monitor(volume_settings(tmp_path, sqlite_database), sqlite_database, fixed(0.1)).check()
    with sqlite_database.transaction() as session:
        assert session.scalar(select(VolumeSample.id).where(VolumeSample.taken_at < now - timedelta(hours=6))) is None
        assert len(session.scalars(select(VolumeSample.id)).all()) == 3


def test_each_check_publishes_gauges_for_ratios_projection_level_and_thresholds(tmp_path, sqlite_database):
    """Used ratios by resource, the alert level (0/1/2) and the thresholds in force are Prometheus gauges."""
    settings = volume_settings(tmp_path, sqlite_database, volume_warn=0.7, volume_critical=0.8)
    monitor = volume_monitor(settings, sqlite_database,
                             lambda: Usage(used_bytes=820, total_bytes=1000, used_inodes=30, total_inodes=100))
    monitor.check()
    sample = REGISTRY.get_sample_value
    assert sample("media_retention_volume_used_ratio", {"resource": "bytes"}) == pytest.approx(0.82)
    assert sample("media_retention_volume_used_ratio", {"resource": "inodes"}) == pytest.approx(0.30)
    assert (sample("media_retention_volume_used_bytes"), sample("media_retention_volume_capacity_bytes")) == (820, 1000)
    assert sample("media_retention_volume_alert_level") == 2
    assert (sample("media_retention_volume_warn_ratio"), sample("media_retention_volume_critical_ratio")) == (0.7, 0.8)
    assert sample("media_retention_volume_last_sample_timestamp_seconds") == pytest.approx(time.time(), abs=60)


# -- many workers, one notification --------------------------------------------------------------


def test_several_workers_sampling_at_once_notify_once_not_once_each(tmp_path, sqlite_database, receiver):
    """Eight workers cross the threshold together: one firing notice; together again below it: one resolved."""
    def monitor_at(ratio: float) -> Callable[[Database], VolumeMonitor]:
        return lambda db: volume_monitor(volume_settings(tmp_path, db, alert_webhook_url=receiver.url), db, fixed(ratio))

    with structlog.testing.capture_logs() as logs:
        fired = race(8, monitor_at(0.93), sqlite_database.url)
        resolved = race(8, monitor_at(0.40), sqlite_database.url)
    assert Counter(fired) == {"firing": 1, None: 7}
    assert Counter(resolved) == {"resolved": 1, None: 7}
    assert [p["status"] for p in receiver.payloads()] == ["firing", "resolved"]
    assert events(logs) == ["volume.alert_firing", "volume.alert_resolved"]
    assert alert_row(sqlite_database).version == 2


# -- a webhook that fails never holds anything up ------------------------------------------------


def critical_engine(tmp_path: Path, db: Database, **overrides) -> Engine:
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    settings = volume_settings(tmp_path, db, **thresholds_below(real_ratio(tmp_path)), **overrides)
    return build(settings, database=db, store=FilesystemStore(media, delete_threads=2))


def test_a_hanging_webhook_does_not_delay_a_sweep_and_is_retried(tmp_path, sqlite_database, receiver):
    """While the check waits on a receiver that never answers, a sweep runs at full speed; the check
    enqueues its sweep before the first attempt, tries twice, and gives up after timeout x attempts."""
    receiver.behaviour = "hang"
    engine = critical_engine(tmp_path, sqlite_database, alert_webhook_url=receiver.url)
    with sqlite_database.transaction() as session:
        session.add(Organization(id="acme", retention_seconds=3600))
    expired = seed_items(engine.db, engine.store.root, "acme", 40)
    enqueued: list[float] = []
    monitor = engine.volume_monitor(enqueue_sweep=lambda: enqueued.append(time.monotonic()))
    monitor.notifiers = [LogNotifier(), WebhookNotifier(receiver.url, timeout=1, attempts=2, backoff=0.2)]
    outcome: dict = {}

    def check() -> None:
        started = time.monotonic()
        outcome["report"] = monitor.check()
        outcome["started"], outcome["seconds"] = started, time.monotonic() - started

    checker = threading.Thread(target=check)
    checker.start()
    assert receiver.arrived.wait(5), "the webhook was never called"
    sweep_started = time.monotonic()
    counts = engine.sweeper.sweep()
    sweep_seconds = time.monotonic() - sweep_started
    checker.join(10)

    assert counts.deleted == len(expired) and sweep_seconds < 1.0
    assert enqueued and enqueued[0] - outcome["started"] < 0.5
    assert enqueued[0] < receiver.posts[0]["at"]
    assert len(receiver.posts) == 2
    assert 2.2 <= outcome["seconds"] < 2.2 + 1.5
    assert outcome["report"].notification == "firing"
    assert alert_row(sqlite_database).delivery_pending is True
    engine.store.close()


def test_a_failing_webhook_is_retried_and_its_notice_redelivered_by_a_later_check(tmp_path, sqlite_database, receiver):
    """500s are retried up to the attempt limit without raising; the notice stays pending and a later
    check, once the sender has given up, delivers it."""
    receiver.behaviour = "fail"
    settings = volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url)
    monitor = volume_monitor(settings, sqlite_database, fixed(0.85),
                             notifiers=[LogNotifier(), WebhookNotifier(receiver.url, timeout=1, attempts=3, backoff=0.01)])
    failures = REGISTRY.get_sample_value("media_retention_alert_delivery_failures_total", {"sink": "webhook"})
    with structlog.testing.capture_logs() as logs:
        assert monitor.check().notification == "firing"
    assert len(receiver.posts) == 3
    assert events(logs, "volume.webhook") == ["volume.webhook_attempt_failed"] * 3 + ["volume.webhook_failed"]
    assert REGISTRY.get_sample_value("media_retention_alert_delivery_failures_total", {"sink": "webhook"}) == failures + 1
    assert alert_row(sqlite_database).delivery_pending is True

    receiver.behaviour = "ok"
    assert monitor.check().notification is None  # the first sender may still be trying: too early to re-send
    age_notification(sqlite_database, 60)
    assert monitor.check().notification == "redelivery"
    assert len(receiver.posts) == 4 and receiver.payloads()[-1]["alerts"][0]["status"] == "firing"
    assert alert_row(sqlite_database).delivery_pending is False
    assert monitor.check().notification is None


def test_a_webhook_refusing_the_request_is_not_retried(tmp_path, sqlite_database, receiver):
    """A 400 would be refused again: one attempt, then the notice waits for redelivery."""
    receiver.behaviour = "refuse"
    monitor = volume_monitor(volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url), sqlite_database,
                             fixed(0.95),
                             notifiers=[LogNotifier(), WebhookNotifier(receiver.url, timeout=1, attempts=3, backoff=0.01)])
    with structlog.testing.capture_logs() as logs:
        monitor.check()
    assert len(receiver.posts) == 1
    assert all("s3cret" not in json.dumps(entry) for entry in logs), "the webhook URL's token must not be logged"


def test_a_broker_outage_while_enqueueing_the_sweep_does_not_stop_the_alert(tmp_path, sqlite_database, receiver):
    """The alert still fires, and its annotation says the immediate sweep could not be enqueued."""
    def broken() -> None:
        raise ConnectionError("broker down")

    monitor = volume_monitor(volume_settings(tmp_path, sqlite_database, alert_webhook_url=receiver.url), sqlite_database,
                             fixed(0.95), enqueue_sweep=broken)
    assert monitor.check().notification == "firing"
    assert receiver.payloads()[0]["alerts"][0]["annotations"]["sweep"].startswith("enqueueing an immediate sweep failed")


# -- Alertmanager's own API ----------------------------------------------------------------------


@pytest.fixture
def alertmanagers() -> Iterator[list[Receiver]]:
    """Two stand-ins for an HA pair of Alertmanagers (real HTTP servers recording what is posted)."""
    pair = [Receiver(), Receiver()]
    yield pair
    for server in pair:
        server.close()


def set_since(db: Database, seconds_ago: int) -> None:
    """The alert's current level began `seconds` ago, by the database clock."""
    with db.transaction() as session:
        session.execute(update(VolumeAlert.__table__).values(since=db_time(db, seconds_ago)))


def test_alertmanager_is_posted_the_alert_at_every_check_while_it_holds_then_the_resolve(tmp_path, sqlite_database,
                                                                                         alertmanagers):
    """Each check posts a JSON array to /api/v2/alerts of every Alertmanager: firing with endsAt four check
    intervals ahead while raised, then the resolved alert (endsAt = its recovery) until a firing post could
    have expired, then nothing."""
    settings = volume_settings(tmp_path, sqlite_database, volume_check_interval="1m",
                               alertmanager_url=",".join(server.base for server in alertmanagers))
    monitor = volume_monitor(settings, sqlite_database, fixed(0.85, 0.86, 0.87, 0.40, 0.40, 0.40))
    kinds = [monitor.check().notification for _ in range(3)]
    started = time.time()
    kinds += [monitor.check().notification, monitor.check().notification]
    set_since(sqlite_database, 4 * 60)
    kinds.append(monitor.check().notification)
    assert kinds == ["firing", None, None, "resolved", None, None]
    for server in alertmanagers:
        assert {post["path"] for post in server.posts} == {"/api/v2/alerts"}
        assert {post["content_type"] for post in server.posts} == {"application/json"}
        posted = server.payloads()
        assert len(posted) == 5 and all(isinstance(alerts, list) and len(alerts) == 1 for alerts in posted)
        firing, resolved = [alerts[0] for alerts in posted[:3]], [alerts[0] for alerts in posted[3:]]
        assert {alert["labels"]["severity"] for alert in firing + resolved} == {"warning"}
        assert len({alert["startsAt"] for alert in firing + resolved}) == 1
        for alert in firing:
            ends_in = datetime.fromisoformat(alert["endsAt"]).timestamp() - started
            assert 4 * 60 - 30 < ends_in < 4 * 60 + 30
        assert resolved[0] == resolved[1] and datetime.fromisoformat(resolved[0]["endsAt"]).timestamp() <= time.time()
        assert float(firing[2]["annotations"]["used_bytes_ratio"]) == 0.87


def test_a_failing_alertmanager_is_counted_and_posted_again_at_the_next_check_while_its_peer_gets_every_post(
        tmp_path, sqlite_database, alertmanagers):
    """One of two Alertmanagers answers 500: its sink's failure counter rises, the other is unaffected, and
    the next check's post reaches it once it is back."""
    broken, healthy = alertmanagers
    broken.behaviour = "fail"
    settings = volume_settings(tmp_path, sqlite_database)
    sinks = [AlertmanagerNotifier(f"{server.base}/api/v2/alerts", timeout=1, attempts=2, backoff=0.01,
                                  check_interval=settings.volume_check_interval) for server in alertmanagers]
    monitor = volume_monitor(settings, sqlite_database, fixed(0.95), notifiers=[LogNotifier(), *sinks])
    before = REGISTRY.get_sample_value("media_retention_alert_delivery_failures_total", {"sink": "alertmanager"})
    with structlog.testing.capture_logs() as logs:
        monitor.check()
    assert (len(broken.posts), len(healthy.posts)) == (2, 1)
    assert events(logs, "volume.alertmanager") == ["volume.alertmanager_attempt_failed"] * 2 + [
        "volume.alertmanager_failed", "volume.alertmanager_delivered"]
    assert REGISTRY.get_sample_value("media_retention_alert_delivery_failures_total", {"sink": "alertmanager"}) == before + 1
    broken.behaviour = "ok"
    monitor.check()
    assert broken.payloads()[-1] == healthy.payloads()[-1]
    assert broken.payloads()[-1][0]["labels"]["severity"] == "critical"


def test_a_webhook_url_naming_alertmanagers_api_is_spoken_to_in_that_api_and_the_log_says_which_setting_to_use(
        tmp_path, sqlite_database, receiver):
    """ALERT_WEBHOOK_URL=.../api/v2/alerts gets arrays of postable alerts (not the webhook shape Alertmanager
    refuses), and `volume.webhook_is_alertmanager` names MEDIA_RETENTION_ALERTMANAGER_URL once per process."""
    url = f"{receiver.base}/api/v2/alerts"
    settings = volume_settings(tmp_path, sqlite_database, alert_webhook_url=url)
    with structlog.testing.capture_logs() as logs:
        first = volume_monitor(settings, sqlite_database, fixed(0.95))
        first.check()
        volume_monitor(settings, sqlite_database, fixed(0.95)).check()
    assert [type(notifier) for notifier in first.notifiers] == [LogNotifier, AlertmanagerNotifier]
    assert first.notifiers[1].url == url
    assert all(isinstance(payload, list) and payload[0]["labels"]["severity"] == "critical" for payload in receiver.payloads())
    assert len(receiver.posts) == 2
    advice = [entry for entry in logs if entry["event"] == "volume.webhook_is_alertmanager"]
    assert len(advice) == 1 and "MEDIA_RETENTION_ALERTMANAGER_URL" in advice[0]["hint"]
    assert advice[0]["target"] == receiver.base
    assert alert_row(sqlite_database).delivery_pending is False


def test_an_unreachable_alertmanager_is_logged_by_origin_only(tmp_path, sqlite_database):
    """Connection refused on a URL with a user, a password and a token: the log names scheme, host and port only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://ops:pa55w0rd@127.0.0.1:{port}/t0k3n/api/v2/alerts?key=s3cret"
    settings = volume_settings(tmp_path, sqlite_database)
    sink = AlertmanagerNotifier(url, timeout=1, attempts=2, backoff=0.01, check_interval=settings.volume_check_interval)
    monitor = volume_monitor(settings, sqlite_database, fixed(0.95), notifiers=[LogNotifier(), sink])
    with structlog.testing.capture_logs() as logs:
        monitor.check()
    failed = [entry for entry in logs if entry["event"].startswith("volume.alertmanager")]
    assert [entry["event"] for entry in failed][-1] == "volume.alertmanager_failed"
    assert {entry["target"] for entry in failed} == {f"http://127.0.0.1:{port}"}
    assert "ConnectionError" in failed[-1]["error"]
    text = json.dumps(logs, default=str)
    assert not any(secret in text for secret in ("pa55w0rd", "t0k3n", "s3cret", "ops:"))


# -- object stores -------------------------------------------------------------------------------


class _ObjectStore(BlobStore):
    """Any store that is not a filesystem: the monitor measures it from the catalog, never from the store."""

    url = "s3://bucket/media"

    def put_file(self, key, source):
        raise NotImplementedError

    def stat(self, key):
        raise NotImplementedError

    def delete_many(self, keys):
        raise NotImplementedError

    def iter_keys(self):
        raise NotImplementedError

    def read_marker(self):
        raise NotImplementedError

    def write_marker(self, content):
        raise NotImplementedError


def _items(db: Database, sizes_by_state: dict[str, int]) -> None:
    with db.transaction() as session:
        session.add(Organization(id="acme", retention_seconds=3600))
        now = session.scalar(select(db_now()))
        session.flush()
        session.execute(insert(MediaItem), [
            {"id": f"m-{state}", "org_id": "acme", "storage_key": f"k/{state}", "size_bytes": size, "mime_type": "image/png",
             "created_at": now, "expires_at": now, "state": state}
            for state, size in sizes_by_state.items()
        ])


def test_an_object_store_is_measured_as_live_media_bytes_against_the_configured_capacity(tmp_path, sqlite_database):
    """Active and deleting items count (their blobs still exist); tombstones do not."""
    _items(sqlite_database, {State.ACTIVE.value: 600, State.DELETING.value: 250, State.DELETED.value: 10_000})
    settings = volume_settings(tmp_path, sqlite_database, storage_url="s3://bucket/media", s3_capacity_bytes=1000)
    report = build(settings, database=sqlite_database, store=_ObjectStore()).volume_monitor().check()
    assert (report.usage.used_bytes, report.usage.total_bytes, report.usage.used_inodes) == (850, 1000, None)
    assert (report.evaluation.level.value, report.evaluation.reason) == ("warning", "bytes")


def test_an_object_store_without_a_capacity_says_which_setting_to_set_and_raises_nothing(tmp_path, sqlite_database):
    """No capacity, no ratio: the check reports used bytes and names MEDIA_RETENTION_S3_CAPACITY_BYTES."""
    _items(sqlite_database, {State.ACTIVE.value: 600})
    settings = volume_settings(tmp_path, sqlite_database, storage_url="s3://bucket/media")
    with structlog.testing.capture_logs() as logs:
        report = build(settings, database=sqlite_database, store=_ObjectStore()).volume_monitor().check()
    assert report.evaluation is None and report.usage.used_bytes == 600
    assert "MEDIA_RETENTION_S3_CAPACITY_BYTES" in report.message
    assert events(logs, "volume.") == ["volume.capacity_unknown"]
    assert alert_row(sqlite_database) is None


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> Callable[..., tuple[int, str, str]]:
    """Run `media-retention volume` in this process on embedded defaults, with extra settings as env vars."""
    for name in ("MEDIA_RETENTION_DATABASE_URL", "MEDIA_RETENTION_STORAGE_URL", "MEDIA_RETENTION_ALERT_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDIA_RETENTION_DATA_DIR", str(tmp_path / "data"))

    def run(*args: str, capsys=None, **env: str) -> int:
        for name, value in env.items():
            monkeypatch.setenv(f"MEDIA_RETENTION_{name.upper()}", value)
        get_settings.cache_clear()
        return main(["volume", *args])

    yield run
    get_settings.cache_clear()


def test_the_volume_command_prints_bytes_inodes_projection_and_alert_state_as_json(embedded, capsys, tmp_path):
    """`volume --json`: used/total/ratio for bytes and inodes, the projection, the level and the fleet's alert."""
    assert embedded("--json") == 0
    shown = json.loads(capsys.readouterr().out)
    real = filesystem_usage(tmp_path / "data" / "media")
    assert shown["bytes"]["total"] == real.total_bytes
    assert shown["bytes"]["ratio"] == pytest.approx(real.ratio("bytes"), abs=0.01)
    assert shown["inodes"]["used"] > 0 or real.total_inodes is None
    assert shown["projection"]["status"] == "insufficient_data"
    assert shown["alert"]["level"] == "ok" and shown["level"] in ("ok", "warning", "critical")
    assert shown["thresholds"] == {"warn": 0.8, "critical": 0.9, "hysteresis": 0.05, "horizon": "1d"}


def test_the_volume_command_exits_0_at_critical_and_changes_nothing(embedded, capsys, tmp_path):
    """The level is information, not failure; the command neither samples into the history nor notifies."""
    (tmp_path / "data").mkdir()
    ratio = real_ratio(tmp_path)
    assert embedded(**{k: str(v) for k, v in thresholds_below(ratio).items()}) == 0
    out = capsys.readouterr().out
    assert "level: critical" in out and "bytes: used=" in out and "alert: level=ok" in out
    db = Database(f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}")
    with db.transaction() as session:
        assert session.scalars(select(VolumeSample.id)).all() == []
    db.dispose()


def test_the_volume_task_checks_through_the_celery_app_and_sends_the_sweep_by_name(tmp_path, monkeypatch):
    """`media_retention.check_volume` runs the check; at critical it sends `SWEEP_TASK` with an expiry."""
    monkeypatch.setenv("MEDIA_RETENTION_DATA_DIR", str(tmp_path / "data"))
    for name, value in thresholds_below(real_ratio(tmp_path)).items():
        monkeypatch.setenv(f"MEDIA_RETENTION_{name.upper()}", str(value))
    for name in ("MEDIA_RETENTION_DATABASE_URL", "MEDIA_RETENTION_STORAGE_URL", "MEDIA_RETENTION_ALERT_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    from worker import runtime, schema

    runtime.reset()
    try:
        (tmp_path / "data").mkdir()
        schema.upgrade(runtime.engine().db)
        from tasks.volume import app, check_volume

        sent: list[tuple] = []
        monkeypatch.setattr(app, "send_task", lambda name, **options: sent.append((name, options)))
        result = check_volume.apply().get()
        assert result["level"] == "critical" and result["notification"] == "firing"
        assert sent == [(SWEEP_TASK, {"expires": 60.0})]
        assert "tasks.volume" in app.conf.include or "tasks.volume" in app.loader.default_modules
    finally:
        runtime.reset()
        get_settings.cache_clear()
