"""With MEDIA_RETENTION_LOG_FORMAT=json, every line a process writes, on stdout and on stderr, is one JSON object.

A line-by-line log shipper (jq, Loki, Fluent Bit) breaks on any other line. The processes are the installed
wheel's, started as the deploy files start them (`celery -A worker.app worker|beat`, `media-retention serve`,
`media-retention run`), on PostgreSQL and Redis and on the embedded defaults; they do real work (a sweep
deleting an item, lookups, a scrape) and are stopped with SIGTERM, a warm shutdown, as systemd and Kubernetes
stop them. Celery's banners, its "Warm shutdown" line, library warnings (Celery's SecurityWarning as root)
and billiard's pool messages used to be plain text in that stream.
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.field.conftest import Installed, run
from tests.fleet import wait_until

pytestmark = [pytest.mark.slow]

# Fields every log event carries (config/logging.py).
EVENT_FIELDS = {"event", "level", "timestamp"}


@dataclass
class Started:
    """A long-running process of the installed venv, its stdout and stderr kept in separate files."""

    name: str
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def stop(self) -> int:
        """SIGTERM to the process itself (a container's PID 1, systemd's main PID), and its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} did not stop within 60 s of SIGTERM:\n{self.stderr.read_text()[-3000:]}")


def start(installed: Installed, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, logs: Path) -> Started:
    stdout, stderr = logs / f"{name}.out", logs / f"{name}.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen([installed.bin(argv[0]), *argv[1:]], env=env, cwd=cwd, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Started(name, process, stdout, stderr)


def log_events(text: str, where: str) -> list[dict]:
    """Every line of `text` as a log event; fails naming the first line that is not one."""
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"{where}, line {number} is not JSON: {line!r}\n--- all of it:\n{text[-4000:]}") from None
        assert isinstance(event, dict) and EVENT_FIELDS <= event.keys(), f"{where}, line {number} is not a log event: {line!r}"
        events.append(event)
    return events


def json_lines(text: str, where: str) -> list[dict]:
    """Every line of a command's stdout as a JSON object (a `--json` result, not a log event)."""
    results = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            results.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{where}, line {number} is not JSON: {line!r}") from None
    return results


def cli(installed: Installed, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """An operator's command with --json: its stdout JSON results, its stderr log events, whatever the outcome."""
    completed = run([installed.bin("media-retention"), *args, "--json"], env=env, cwd=cwd)
    json_lines(completed.stdout, f"stdout of `media-retention {' '.join(args)}`")
    log_events(completed.stderr, f"stderr of `media-retention {' '.join(args)}`")
    return completed


def expired_item(installed: Installed, media_id: str, *, env: dict[str, str], cwd: Path) -> None:
    assert cli(installed, "org", "set", "acme", "--retention", "90d", env=env, cwd=cwd).returncode == 0
    upload = cwd / f"{media_id}.jpg"
    upload.write_bytes(b"\xff\xd8 json logs " + media_id.encode())
    created = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    registered = cli(installed, "register", "--org", "acme", "--file", str(upload), "--id", media_id, "--ttl", "1h",
                     "--created-at", created, env=env, cwd=cwd)
    assert registered.returncode == 0, registered.stderr


def deleted(installed: Installed, media_id: str, *, env: dict[str, str], cwd: Path) -> bool:
    looked = cli(installed, "lookup", media_id, env=env, cwd=cwd)
    return looked.returncode == 3 and json.loads(looked.stdout)["state"] == "deleted"


@pytest.fixture(params=["postgres-redis", "embedded"])
def deployment(request, installed, tmp_path) -> tuple[dict[str, str], Path]:
    """The environment of a deployment in JSON log format: PostgreSQL and Redis, or the embedded defaults."""
    settings = {"data_dir": tmp_path / "data", "log_format": "json", "sweep_interval": "1h", "volume_check_interval": "2s",
                "watch_interval": "off"}
    if request.param == "postgres-redis":
        settings["database_url"] = request.getfixturevalue("fresh_schema")
        settings["broker_url"] = request.getfixturevalue("redis_server").url
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return installed.env(**settings), cwd


def test_worker_beat_and_serve_write_only_json_log_events_from_start_to_warm_shutdown(installed, deployment, tmp_path):
    """A worker, beat and serve that start, sweep an item away through the broker, answer lookups and a scrape,
    and stop on SIGTERM write nothing on stdout or stderr but JSON log events, the worker's start and
    warm shutdown among them; `db upgrade` and the operator's commands write JSON results and JSON events."""
    env, cwd = deployment
    logs = tmp_path / "logs"
    logs.mkdir()
    metrics_port, http_port = free_port(), free_port()

    upgrade = cli(installed, "db", "upgrade", env=env, cwd=cwd)
    assert upgrade.returncode == 0, upgrade.stderr
    # Alembic's routine lines (its plugins, its migration context) stay out of the upgrade's output.
    assert "alembic" not in upgrade.stderr

    processes = [
        start(installed, "worker", ["celery", "-A", "worker.app", "worker", "--concurrency", "2", "--loglevel", "INFO"],
              env={**env, "MEDIA_RETENTION_METRICS_PORT": str(metrics_port)}, cwd=cwd, logs=logs),
        start(installed, "beat", ["celery", "-A", "worker.app", "beat", "--loglevel", "INFO"], env=env, cwd=cwd, logs=logs),
        start(installed, "serve", ["media-retention", "serve", "--host", "127.0.0.1", "--port", str(http_port)],
              env=env, cwd=cwd, logs=logs),
    ]
    try:
        expired_item(installed, "json-logs-1", env=env, cwd=cwd)
        swept = cli(installed, "sweep", "--enqueue", env=env, cwd=cwd)
        assert swept.returncode == 0, swept.stderr
        wait_until(lambda: deleted(installed, "json-logs-1", env=env, cwd=cwd), 60, "the worker's sweep to delete the item")

        status, scrape = wait_until(lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), 30, "the worker's /metrics")
        assert status == 200 and "media_retention_" in scrape
        key = json.loads(cli(installed, "apikey", "create", "--org", "acme", env=env, cwd=cwd).stdout)
        status, answer = wait_until(lambda: _get(f"http://127.0.0.1:{http_port}/v1/media/json-logs-1",
                                                 headers={"Authorization": f"Bearer {key['token']}"}), 30, "serve to answer")
        assert status == 404 and json.loads(answer)["error"] == "gone"
        wait_until(lambda: "volume.checked" in (logs / "worker.err").read_text(), 30, "beat's volume check to run on the worker")
    finally:
        codes = {started.name: started.stop() for started in processes}

    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully ("Finished server process" below).
    assert codes["worker"] == 0 and codes["beat"] == 0 and codes["serve"] in (0, -signal.SIGTERM), codes
    events = {}
    for started in processes:
        # stdout too: Celery printed its banners and "Warm shutdown" there.
        log_events(started.stdout.read_text(), f"stdout of {started.name}")
        events[started.name] = log_events(started.stderr.read_text(), f"stderr of {started.name}")
    worker_events = [event["event"] for event in events["worker"]]
    assert {"worker.starting", "sweep.finished", "volume.checked", "worker.shutting_down"} <= set(worker_events)
    [shutdown] = [event for event in events["worker"] if event["event"] == "worker.shutting_down"]
    assert shutdown["how"] == "warm" and shutdown["signal"] == "SIGTERM"
    assert "beat.starting" in {event["event"] for event in events["beat"]}
    serve_events = [event["event"] for event in events["serve"]]
    assert "serve.starting" in serve_events and "http.request" in serve_events
    assert any(event.startswith("Finished server process") for event in serve_events)


def test_run_writes_only_json_log_events_from_start_to_warm_shutdown(installed, tmp_path):
    """`media-retention run` (worker and beat in one process, embedded defaults) that sweeps an item away and
    stops on SIGTERM writes nothing but JSON log events."""
    cwd, logs = tmp_path / "cwd", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    env = installed.env(data_dir=tmp_path / "data", log_format="json", sweep_interval="1s", watch_interval="off")
    runner = start(installed, "run", ["media-retention", "run"], env=env, cwd=cwd, logs=logs)
    try:
        wait_until(lambda: "worker.starting" in runner.stderr.read_text() or runner.process.poll() is not None, 60,
                   "run to start its worker")
        expired_item(installed, "json-logs-run", env=env, cwd=cwd)
        wait_until(lambda: deleted(installed, "json-logs-run", env=env, cwd=cwd), 60, "run's scheduled sweep to delete the item")
    finally:
        code = runner.stop()

    assert code == 0
    log_events(runner.stdout.read_text(), "stdout of run")
    events = [event["event"] for event in log_events(runner.stderr.read_text(), "stderr of run")]
    assert {"worker.starting", "worker.shutting_down"} <= set(events)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str] | None:
    """Status and body of a GET, or None while nothing listens yet."""
    try:
        response = requests.get(url, headers=headers, timeout=5)
    except requests.ConnectionError:
        return None
    return response.status_code, response.text
