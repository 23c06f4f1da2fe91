"""Where each process tree keeps prometheus-client's multiprocess files (worker/app.py)."""

import subprocess
import sys

from worker.app import metrics_directory


def test_a_process_loading_the_app_never_empties_a_running_workers_metrics_directory(tmp_path):
    """Beat or an operator's command on the worker's data dir gets a directory of its own; the live
    worker's files stay, a dead process' directory and old flat-layout files go."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        parent = tmp_path / "prometheus"
        (parent / str(worker.pid)).mkdir(parents=True)
        (parent / str(worker.pid) / "counter_1.db").write_bytes(b"live counts")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (parent / dead.stdout.strip()).mkdir()
        (parent / "counter_7.db").write_bytes(b"old layout")

        mine = metrics_directory(parent, 4_000_000)

        assert mine == parent / "4000000" and mine.is_dir() and not any(mine.iterdir())
        assert (parent / str(worker.pid) / "counter_1.db").read_bytes() == b"live counts"
        assert sorted(entry.name for entry in parent.iterdir()) == sorted([str(worker.pid), "4000000"])
    finally:
        worker.kill()
        worker.wait()


def test_a_restarted_process_with_a_recycled_pid_starts_from_an_empty_directory(tmp_path):
    """Files left under the same pid by an earlier process are not counted again."""
    parent = tmp_path / "prometheus"
    (parent / "4000001").mkdir(parents=True)
    (parent / "4000001" / "counter_1.db").write_bytes(b"stale")
    assert not any(metrics_directory(parent, 4_000_001).iterdir())
