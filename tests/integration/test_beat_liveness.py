"""Beat's Kubernetes liveness probe, run as the deploy file writes it, against `celery beat` started as the
deploy file starts it, on a Python whose dbm is the dumb fallback (gdbm and ndbm blocked): the probe must
not depend on how the schedule file is stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from config.settings import Settings
from tests.fleet import wait_until
from worker.app import create_app
from worker.beat import HEARTBEAT_FILE, HeartbeatScheduler

pytestmark = [pytest.mark.redis, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
IMAGE_DATA_DIR = "/var/lib/media-retention"
# The probe allows 10 minutes; a test stands in for their passing by ageing the file by this much.
STALE_S = 11 * 60
# Imported first by every Python started with this directory on PYTHONPATH: gdbm and ndbm refuse to load,
# as on a Python built without them, so shelve (and beat's schedule) falls back to dbm.dumb.
NO_GDBM = '''
import sys

class _Refuse:
    BLOCKED = {"_gdbm", "dbm.gnu", "_dbm", "dbm.ndbm"}

    def find_spec(self, name, path=None, target=None):
        if name in self.BLOCKED:
            raise ImportError(f"{name} blocked: a Python built without gdbm")
        return None

sys.meta_path.insert(0, _Refuse())
'''


def _beat_container() -> dict:
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text()) if doc]
    [beat] = [doc for doc in documents if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "media-retention-beat"]
    [container] = beat["spec"]["template"]["spec"]["containers"]
    return container


def _probe(data_dir: Path) -> list[str]:
    command = _beat_container()["livenessProbe"]["exec"]["command"]
    return [part.replace(IMAGE_DATA_DIR, str(data_dir)) for part in command]


def _passes(probe: list[str]) -> bool:
    return subprocess.run(probe, check=False, capture_output=True, timeout=10, stdin=subprocess.DEVNULL).returncode == 0


def _age(path: Path) -> None:
    stale = time.time() - STALE_S
    os.utime(path, (stale, stale))


@pytest.fixture
def beat_without_gdbm(tmp_path, private_redis):
    """`celery -A worker.app beat …` (the container's command) with the data dir and broker pointed at the
    test's, the sweep every second, and gdbm/ndbm blocked."""
    blocker = tmp_path / "no-gdbm"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_GDBM)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    command = _beat_container()["command"]
    assert command[:4] == ["celery", "-A", "worker.app", "beat"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDIA_RETENTION_")}
    env.update(PYTHONPATH=os.pathsep.join([str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])]),
               MEDIA_RETENTION_DATA_DIR=str(data_dir), MEDIA_RETENTION_BROKER_URL=private_redis.url,
               MEDIA_RETENTION_SWEEP_INTERVAL="1s", MEDIA_RETENTION_LOG_FORMAT="json")
    log = tmp_path / "beat.log"
    with log.open("wb") as output:
        process = subprocess.Popen([str(Path(sys.executable).parent / "celery"), *command[1:]], env=env, cwd=data_dir,
                                   stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process, data_dir, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_the_beat_probe_passes_while_beat_runs_and_fails_once_it_hangs_or_stops_without_gdbm(beat_without_gdbm):
    """Fails before beat starts; passes once beat schedules, on dbm.dumb; a hung beat (SIGSTOP) leaves the
    heartbeat stale and the probe failing; resumed, beat freshens it; stopped, the probe fails again."""
    process, data_dir, log = beat_without_gdbm
    probe = _probe(data_dir)
    heartbeat = data_dir / HEARTBEAT_FILE
    assert not _passes(probe)

    wait_until(lambda: process.poll() is None and heartbeat.exists(), 60, "beat to write its heartbeat")
    assert _passes(probe), log.read_text()[-3000:]
    # The schedule went to dbm.dumb's files: gdbm really was unavailable to beat.
    assert (data_dir / "celerybeat-schedule.dat").exists(), sorted(p.name for p in data_dir.iterdir())

    os.killpg(process.pid, signal.SIGSTOP)
    _age(heartbeat)
    time.sleep(3)  # three sweep intervals: a beat that still ticked would have touched the file
    assert not _passes(probe), "a hung beat passed its liveness probe"

    os.killpg(process.pid, signal.SIGCONT)
    wait_until(lambda: _passes(probe), 10, "the resumed beat to freshen its heartbeat")

    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    _age(heartbeat)
    assert not _passes(probe), "a stopped beat passed its liveness probe"


def test_beat_ticks_at_least_twice_within_the_probes_ten_minutes(tmp_path):
    """The heartbeat is touched at every tick and a tick comes at least every `max_interval`: the probe's
    10 minutes leave room for one missed tick, so an idle but healthy beat is never restarted."""
    app = create_app(Settings(data_dir=tmp_path))
    assert app.conf.beat_scheduler == "worker.beat:HeartbeatScheduler"
    scheduler = HeartbeatScheduler(app, lazy=True)
    assert scheduler.heartbeat == tmp_path / HEARTBEAT_FILE
    assert 2 * scheduler.max_interval <= 10 * 60
    assert "-mmin -10" in " ".join(_beat_container()["livenessProbe"]["exec"]["command"])
