"""The installed wheel as a fleet: `db upgrade`, a real `celery worker` and `celery beat` from the venv on
PostgreSQL and a private Redis, sweeps driven through the broker, lookups answering 404, the operator's
celery commands, and the worker's /metrics as Prometheus, the rules and the dashboard read it."""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from tests.conftest import free_port
from tests.deploy_files import alert_rules, dashboard_queries
from tests.field.conftest import Installed, Processes, memory_kib, run
from tests.fleet import wait_until
from tests.tools import require_tool
from worker import schema
from worker.db import Database
from worker.models import VolumeSample
from worker.store import MARKER_NAME

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

# The worker's node name: `inspect ping --destination` returns as soon as it answers.
NODE = f"field@{socket.gethostname()}"
# Kubernetes' memory request for a worker (deploy/kubernetes/media-retention.yaml): the measured
# resident size of a worker must stay below it.
WORKER_MEMORY_REQUEST_KIB = 256 * 1024


@dataclass
class Field:
    installed: Installed
    processes: Processes
    env: dict[str, str]
    cwd: Path
    media: Path
    database: Database
    metrics_port: int
    upgrade: object

    def cli(self, *args: str, timeout: float = 60):
        return run([self.installed.bin("media-retention"), *args], env=self.env, cwd=self.cwd, timeout=timeout)

    def celery(self, *args: str, timeout: float = 60):
        return run([self.installed.bin("celery"), "-A", "worker.app", *args], env=self.env, cwd=self.cwd, timeout=timeout)

    def scrape(self, path: str = "/metrics") -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10).read().decode()


@pytest.fixture(scope="module")
def fleet(installed, outside, fresh_schema, redis_server, tmp_path_factory) -> Iterator[Field]:
    """`media-retention db upgrade`, then one worker (two pool processes) and beat, all from the installed venv."""
    base = tmp_path_factory.mktemp("field-fleet")
    media = base / "media"
    media.mkdir()
    port = free_port()
    env = installed.env(
        database_url=fresh_schema, broker_url=redis_server.url, storage_url=media.as_uri(), data_dir=base / "data",
        log_format="json", metrics_port=port,
        # Beat's sweeps stay out of the way (the tests drive sweeps through the broker themselves);
        # its volume checks come every 2 s, so a test sees beat at work within seconds. The expiry
        # watch is off for the same reason: on, it deletes an expired item within about a second of
        # its registration, racing the test's own lookup and sweeps (it lost that race on a loaded
        # machine, under pytest-xdist).
        sweep_interval="1h", volume_check_interval="2s", watch_interval="off")
    upgrade = run([installed.bin("media-retention"), "db", "upgrade", "--json"], env=env, cwd=outside)
    assert upgrade.returncode == 0, upgrade.stderr
    processes = Processes(base)
    database = Database(fresh_schema)
    field = Field(installed, processes, env, outside, media, database, port, upgrade)
    try:
        processes.start("worker", [installed.bin("celery"), "-A", "worker.app", "worker", "--concurrency", "2",
                                   "--loglevel", "INFO", "--hostname", NODE], env=env, cwd=outside)
        processes.start("beat", [installed.bin("celery"), "-A", "worker.app", "beat", "--loglevel", "INFO"],
                        env=env, cwd=outside)
        wait_until(lambda: "pong" in field.celery("inspect", "ping", "--timeout", "2", "--destination", NODE).stdout, 60,
                   "the worker to answer")
        yield field
    finally:
        processes.stop_all()
        database.dispose()


def _expired_item(field: Field, media_id: str) -> None:
    upload = field.cwd / f"{media_id}.jpg"
    upload.write_bytes(b"\xff\xd8 field test " + media_id.encode())
    created = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    registered = field.cli("register", "--org", "acme", "--file", str(upload), "--id", media_id, "--ttl", "1h",
                           "--created-at", created, "--json")
    assert registered.returncode == 0, registered.stderr
    looked = field.cli("lookup", media_id, "--json")
    # Past its expiry it answers 404 before any sweep, unless a sweep already took it.
    assert looked.returncode == 3 and json.loads(looked.stdout)["state"] in ("expired", "deleting", "deleted")


def _gone(field: Field, media_id: str) -> dict | None:
    """The 404 body once a sweep deleted the item (an expired one answers 404 before that)."""
    looked = field.cli("lookup", media_id, "--json")
    body = json.loads(looked.stdout) if looked.returncode == 3 else None
    return body if body and body.get("state") == "deleted" else None


def test_what_runs_is_the_installed_wheel_not_the_source_tree(fleet):
    """`worker`, `tasks` and `config` import from the venv's site-packages, in a directory outside the repository."""
    probe = run([fleet.installed.bin("python"), "-c",
                 "import config, tasks, worker; print(worker.__file__, tasks.__file__, config.__file__)"],
                env=fleet.env, cwd=fleet.cwd)
    assert probe.returncode == 0, probe.stderr
    for path in probe.stdout.split():
        assert Path(path).is_relative_to(fleet.installed.venv / "lib"), path
    extras = run([fleet.installed.bin("python"), "-c", "import pytest"], env=fleet.env, cwd=fleet.cwd)
    assert extras.returncode != 0, "the field venv must not hold the test extras"


def test_db_upgrade_from_the_venv_creates_the_schema(fleet):
    """`media-retention db upgrade --json` exits 0, from nothing to head, printing no password."""
    result = json.loads(fleet.upgrade.stdout)
    assert (result["from"], result["to"]) == (None, schema.head_revision())
    assert schema.current_revision(fleet.database) == schema.head_revision()


def test_sweeps_sent_through_the_broker_delete_expired_media_and_lookups_answer_404(fleet):
    """`sweep --enqueue` and `celery call media_retention.sweep` each reach the worker over Redis; the
    expired item is deleted (blob gone) and `lookup` exits 3 with status 404."""
    assert fleet.cli("org", "set", "acme", "--retention", "30d").returncode == 0
    _expired_item(fleet, "field-enqueued")
    enqueued = fleet.cli("sweep", "--enqueue", "--json")
    assert enqueued.returncode == 0, enqueued.stderr
    assert json.loads(enqueued.stdout)["enqueued"] == "media_retention.sweep"
    gone = wait_until(lambda: _gone(fleet, "field-enqueued"), 30, "the enqueued sweep to delete the item")
    assert (gone["status"], gone["error"], gone["reason"]) == (404, "gone", "ttl")

    _expired_item(fleet, "field-called")
    called = fleet.celery("call", "media_retention.sweep")
    assert called.returncode == 0 and re.fullmatch(r"[0-9a-f-]{36}", called.stdout.strip()), called.stdout + called.stderr
    gone = wait_until(lambda: _gone(fleet, "field-called"), 30, "the called sweep to delete the item")
    assert gone["status"] == 404
    assert not any(path.is_file() and path.name != MARKER_NAME for path in fleet.media.rglob("*")), "every blob should be deleted"
    fleet.processes.assert_alive("worker")


def test_celery_inspect_ping_and_status_see_the_worker(fleet):
    """The operator's `celery inspect ping` and `celery status` from the venv reach the worker over Redis."""
    ping = fleet.celery("inspect", "ping", "--timeout", "5", "--destination", NODE)
    assert ping.returncode == 0 and NODE in ping.stdout and "pong" in ping.stdout, ping.stdout + ping.stderr
    status = fleet.celery("status", "--timeout", "2")
    assert status.returncode == 0 and "1 node online" in status.stdout, status.stdout + status.stderr


def test_beat_sends_the_volume_check_and_the_worker_runs_it(fleet):
    """Within seconds of starting, beat's schedule has put volume samples in the catalog through the worker."""
    def samples() -> int:
        with fleet.database.transaction() as session:
            return session.scalar(select(func.count()).select_from(VolumeSample))

    wait_until(lambda: samples() >= 2, 30, "beat's volume checks to be run")
    assert "Sending due task check-media-volume" in fleet.processes.log("beat")
    fleet.processes.assert_alive("beat")


def _scraped_names(body: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}


def _full_scrape(fleet: Field) -> str:
    """A scrape once every kind of series exists: a volume check and a finished sweep that deleted an item
    have happened. The sweep and its item are this call's own, so a test reading the scrape passes alone
    or after the others, on whichever pytest-xdist worker it runs."""
    assert fleet.cli("org", "set", "acme", "--retention", "30d").returncode == 0
    _expired_item(fleet, f"field-scrape-{secrets.token_hex(4)}")
    assert fleet.cli("sweep", "--enqueue").returncode == 0

    def complete() -> str | None:
        body = fleet.scrape()
        names = _scraped_names(body)
        wanted = {"media_retention_volume_used_ratio", "media_retention_last_sweep_items",
                  "media_retention_deleted_items_total"}
        return body if wanted <= names else None

    try:
        return wait_until(complete, 30, "a scrape with volume and last-sweep series")
    except AssertionError:
        raise AssertionError(f"incomplete scrape: {sorted(_scraped_names(fleet.scrape()))}") from None


def test_promtool_check_metrics_accepts_what_a_running_worker_serves(fleet):
    """`promtool check metrics` finds the worker's /metrics well-formed and lint-clean."""
    promtool = require_tool("promtool")
    body = _full_scrape(fleet)
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def _lookup_service_scrape(fleet: Field) -> str:
    """/metrics of the installed `media-retention serve` on the fleet's catalog, after a lookup and a probe."""
    port = free_port()
    fleet.processes.start("serve", [fleet.installed.bin("media-retention"), "serve", "--port", str(port)],
                          env=fleet.env, cwd=fleet.cwd)
    base = f"http://127.0.0.1:{port}"

    def answered() -> str | None:
        try:
            urllib.request.urlopen(base + "/readyz", timeout=5)
            try:
                urllib.request.urlopen(base + "/v1/media/field-nothing", timeout=5)
            except urllib.error.HTTPError:
                pass  # 401 without a key: counted and timed like any lookup
            return urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        except OSError:
            fleet.processes.assert_alive("serve")
            return None

    return wait_until(answered, 30, "the lookup service's /metrics")


def test_every_metric_the_dashboard_and_the_rules_query_is_one_a_worker_or_the_lookup_service_serves(fleet):
    """Each `media_retention_*` and `process_*` name in the Grafana dashboard and the Prometheus rules is in a
    real scrape of a worker or of the lookup service."""
    served = _scraped_names(_full_scrape(fleet)) | _scraped_names(_lookup_service_scrape(fleet))
    rules = [rule["expr"] for rule in alert_rules()]
    queries = [expr for _, expr in dashboard_queries()]
    for expr in [*rules, *queries]:
        named = set(re.findall(r"\b(?:media_retention|process)_[a-z_]+\b", expr))
        assert named, f"queries no metric of ours: {expr}"
        assert named <= served, f"not served by a worker: {sorted(named - served)} in {expr}"


def test_a_worker_with_two_pool_processes_fits_its_kubernetes_memory_request(fleet):
    """The worker's memory (main process and pool, after sweeps and volume checks, shared pages counted
    once as a cgroup counts them) stays below the 256 MiB the Kubernetes manifest requests."""
    _full_scrape(fleet)
    memory = memory_kib(fleet.processes.running["worker"].pid)
    print(f"\nfield worker memory: {memory['pss'] / 1024:.0f} MiB proportional, {memory['rss'] / 1024:.0f} MiB resident "
          f"summed over {memory['processes']} processes")
    assert memory["processes"] == 3
    assert 0 < memory["pss"] < WORKER_MEMORY_REQUEST_KIB
