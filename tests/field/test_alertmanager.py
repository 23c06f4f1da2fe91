"""A real Alertmanager hears a volume alert from a running worker and resolves it when the volume drains.

The media volume is a 4 MiB tmpfs mounted for the test: registering a 3.8 MiB expired file fills it
for real (statvfs says 95 %). The check (sent to the worker with `celery call`, as beat would) goes
critical, enqueues the immediate sweep and posts to Alertmanager's API; the sweep deletes the expired
blob, the next check finds the volume empty and posts the resolve. Alertmanager routes both to a
webhook receiver, so the whole path, worker to the people paged, is seen working.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.field.conftest import Processes, run
from tests.fleet import wait_until
from tests.receiver import Receiver
from tests.tools import require_tool, unavailable
from worker.volume import filesystem_usage

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

TMPFS_BYTES = 4 * 1024 * 1024
FILLING_BYTES = int(3.8 * 1024 * 1024)


@pytest.fixture
def small_volume(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a media volume that really fills up (mounting needs root; skipped loudly without)."""
    mountpoint = tmp_path / "media"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs as the media volume ({mounted.stderr.strip() or 'mount failed'}): "
                    "the test needs root with CAP_SYS_ADMIN")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


@pytest.fixture
def alertmanager(tmp_path) -> Iterator[tuple[str, Receiver]]:
    """`prometheus-alertmanager` on a free loopback port (no clustering, storage in tmp), routing every
    alert at once to a webhook receiver; yields its base URL and the receiver."""
    binary = require_tool("prometheus-alertmanager")
    receiver = Receiver()
    config = tmp_path / "alertmanager.yml"
    config.write_text(json.dumps({
        "route": {"receiver": "recorder", "group_by": ["alertname"], "group_wait": "1s", "group_interval": "1s",
                  "repeat_interval": "1h"},
        "receivers": [{"name": "recorder", "webhook_configs": [{"url": f"{receiver.base}/notify", "send_resolved": True}]}],
    }))
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "wb")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={tmp_path / 'am-data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(base, process), 30, "Alertmanager to be ready")
        yield base, receiver
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        receiver.close()


def _ready(base: str, process: subprocess.Popen) -> bool:
    assert process.poll() is None, "Alertmanager exited"
    try:
        return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
    except OSError:
        return False


def _active_volume_alerts(base: str) -> list[dict]:
    query = urllib.request.quote('alertname="MediaVolumeFilling"')
    alerts = json.loads(urllib.request.urlopen(f"{base}/api/v2/alerts?filter={query}", timeout=5).read())
    now = datetime.now(timezone.utc)
    return [alert for alert in alerts if datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00")) > now]


def test_alertmanager_shows_a_volume_alert_from_a_running_worker_and_resolves_it_when_the_volume_drains(
        installed, outside, fresh_schema, redis_server, small_volume, alertmanager, tmp_path):
    """Filled tmpfs -> worker's check -> critical MediaVolumeFilling active in Alertmanager's API (endsAt
    20 minutes ahead) and notified firing; the immediate sweep deletes the expired blob -> next check ->
    the alert leaves the API long before its endsAt, and is notified resolved."""
    base, receiver = alertmanager
    env = installed.env(database_url=fresh_schema, broker_url=redis_server.url.rsplit("/", 1)[0] + "/15",
                        storage_url=small_volume.as_uri(), data_dir=tmp_path / "data", log_format="json",
                        alertmanager_url=base, volume_check_interval="5m",
                        # The expired recording must still fill the volume when the check runs: the
                        # expiry watch would delete it within a second of the worker's start, before
                        # the check (it did on a loaded machine); what drains it here is the sweep the
                        # critical check enqueues.
                        watch_interval="off")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run([installed.bin("media-retention"), *args], env=env, cwd=outside)

    assert cli("db", "upgrade").returncode == 0
    assert cli("org", "set", "acme", "--retention", "30d").returncode == 0
    filling = tmp_path / "recording.mp4"
    filling.write_bytes(os.urandom(FILLING_BYTES))
    created = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    registered = cli("register", "--org", "acme", "--file", str(filling), "--id", "filling", "--ttl", "1h",
                     "--created-at", created)
    assert registered.returncode == 0, registered.stderr
    assert filesystem_usage(small_volume).ratio("bytes") >= 0.90

    processes = Processes(tmp_path)
    try:
        processes.start("worker", [installed.bin("celery"), "-A", "worker.app", "worker", "--concurrency", "1",
                                   "--loglevel", "INFO"], env=env, cwd=outside)
        call = [installed.bin("celery"), "-A", "worker.app", "call", "media_retention.check_volume"]
        assert run(call, env=env, cwd=outside).returncode == 0
        [alert] = wait_until(lambda: _active_volume_alerts(base), 60, "the alert in Alertmanager's API")
        assert alert["labels"] == {"alertname": "MediaVolumeFilling", "severity": "critical",
                                   "service": "media-retention", "volume": "media"}
        assert alert["status"]["state"] == "active"
        assert alert["annotations"]["sweep"] == "an immediate sweep was enqueued (it deletes only expired media)"
        ends_in = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00")) - datetime.now(timezone.utc)
        assert timedelta(minutes=15) < ends_in <= timedelta(minutes=20)

        # The immediate sweep the critical check enqueued deletes the expired recording: the volume drains.
        # `deleted`, not only exit 3: an expired item answers 404 before any sweep.
        wait_until(lambda: '"state": "deleted"' in cli("lookup", "filling").stdout, 30,
                   "the immediate sweep to delete the recording")
        assert filesystem_usage(small_volume).ratio("bytes") < 0.10
        assert run(call, env=env, cwd=outside).returncode == 0
        wait_until(lambda: not _active_volume_alerts(base), 30, "Alertmanager to see the alert resolved")

        notified = wait_until(lambda: (s := [p["status"] for p in receiver.payloads()]) and "resolved" in s and s, 30,
                              "Alertmanager's resolved notification")
        assert notified[0] == "firing" and notified[-1] == "resolved"
        assert {a["labels"]["severity"] for p in receiver.payloads() for a in p["alerts"]} == {"critical"}
        events = [json.loads(line)["event"] for line in processes.log("worker").splitlines() if line.startswith("{")]
        assert events.count("volume.alertmanager_delivered") == 2 and "volume.alertmanager_failed" not in events
        processes.assert_alive("worker")
    finally:
        processes.stop_all()
