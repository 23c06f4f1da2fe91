"""`media-retention run`: worker and beat in one process on the embedded defaults, no server."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.e2e.conftest import SCRIPT


@pytest.fixture
def running(data_dir, tmp_path):
    """Start `media-retention run` on an empty data dir with a 1-second sweep interval (and no expiry watch)."""
    assert not data_dir.exists()
    log = open(tmp_path / "run.log", "w+")
    process = subprocess.Popen([str(SCRIPT), "run"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "MEDIA_RETENTION_SWEEP_INTERVAL": "1s", "MEDIA_RETENTION_LOG_FORMAT": "json",
                                    # The subject is beat's schedule: the expiry watch, on by default, races
                                    # it for the expired item and wins on a loaded machine (under
                                    # pytest-xdist), leaving no scheduled sweep that deleted anything.
                                    "MEDIA_RETENTION_WATCH_INTERVAL": "off"})
    yield process, log
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()


def log_tail(log, lines=40) -> str:
    log.flush()
    log.seek(0)
    return "".join(log.readlines()[-lines:])


def wait_for(predicate, timeout, what, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"; the end of run's log:\n{log_tail(log)}" if log else ""))


def deleted(shell, media_id: str) -> bool:
    """`lookup` answers 404 with the tombstone of a finished deletion (not only `expired`: that needs no sweep)."""
    looked = shell("lookup", media_id, "--json")
    return looked.code == 3 and json.loads(looked.stdout).get("state") == "deleted"


def test_run_starts_from_an_empty_data_dir_and_a_scheduled_sweep_deletes_an_expired_item(running, shell, data_dir, tmp_path):
    """With nothing but an empty data dir, `run` creates schema and broker, and beat's sweep deletes
    an expired item without anyone calling `sweep`; SIGTERM then stops it cleanly."""
    process, log = running
    wait_for(lambda: (data_dir / "catalog.sqlite3").exists(), 30, "the catalog to be created")
    upload = tmp_path / "clip.ogg"
    upload.write_bytes(b"OggS voice note")
    assert shell("org", "set", "acme").code == 0
    keep = shell("register", "--org", "acme", "--file", str(upload), "--id", "fresh", "--json")
    item = shell("register", "--org", "acme", "--file", str(upload), "--id", "expired", "--ttl", "1h",
                 "--created-at", "2020-01-01T00:00:00Z", "--json")
    assert item.code == 0 and keep.code == 0, item.stderr + keep.stderr
    # Written (the store reports its size) - but beat sweeps every second, so it may already be gone.
    assert item.json["size"] == len(b"OggS voice note")
    blob = data_dir / "media" / item.json["key"]
    # An expired item answers 404 from its expiry; `deleted` is what says the sweep took it.
    wait_for(lambda: deleted(shell, "expired"), 45, "the scheduled sweep to delete the item", log)
    assert not blob.exists()
    assert shell("lookup", "fresh").code == 0
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"run did not stop within 60 s of SIGTERM; the end of its log:\n{log_tail(log)}") from None
    assert code == 0, log_tail(log)
    log.seek(0)
    events = [json.loads(line) for line in log if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "sweep.finished" and e.get("deleted")]
    assert finished and finished[0]["task"] == "scheduled_sweep" and finished[0]["task_id"]
    assert (data_dir / "broker").is_dir()


@pytest.mark.parametrize("program", ["worker", "beat"])
def test_celery_with_a_malformed_setting_stops_with_one_sentence_and_exit_two(data_dir, program):
    """`celery -A worker.app worker|beat` refuses a bad setting the way the CLI does, not with a traceback."""
    import sys

    completed = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.app", program], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "MEDIA_RETENTION_CLAIM_LEASE": "a while"})
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "media-retention: invalid setting MEDIA_RETENTION_CLAIM_LEASE: malformed duration 'a while'; use e.g. 30s, 15m, 1h, 7d, 2w or PT1H."]
