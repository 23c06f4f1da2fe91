"""Beat's scheduler: Celery's own, plus a heartbeat file that beat's liveness probe reads.

The probe used to read the schedule file's age, but how often that file is rewritten depends on the dbm
module the Python build has (with `dbm.dumb`, the fallback when gdbm is missing, it may never be), so a
healthy beat could be killed every few minutes. The heartbeat is touched at every turn of the scheduler's
loop instead: fresh while beat schedules, stale once it stops or hangs.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from celery.beat import PersistentScheduler

log = structlog.get_logger("worker.beat")

# In the data dir; deploy/kubernetes/media-retention.yaml's beat liveness probe names it.
HEARTBEAT_FILE = "beat-heartbeat"


class HeartbeatScheduler(PersistentScheduler):
    """Touches `<data dir>/beat-heartbeat` before each tick. A tick comes at least every `max_interval`
    (Celery's default, 5 minutes) and sooner when a schedule entry is due (the sweep, every minute)."""

    def __init__(self, app, *args, **kwargs) -> None:
        self.heartbeat = Path(app.conf.media_retention_settings.data_dir) / HEARTBEAT_FILE
        self._heartbeat_failing = False
        # The data dir usually holds the schedule too, but `beat --schedule=elsewhere` leaves it uncreated.
        self.heartbeat.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(app, *args, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        self._beat()
        return super().tick(*args, **kwargs)

    def _beat(self) -> None:
        try:
            self.heartbeat.touch()
        except OSError as exc:
            # Sending the schedule matters more than the probe: go on, and say so once (the probe will
            # restart beat, and the reason is here).
            if not self._heartbeat_failing:
                log.error("beat.heartbeat_failed", path=str(self.heartbeat), error=str(exc))
            self._heartbeat_failing = True
        else:
            self._heartbeat_failing = False
