"""The volume check: sample the media volume and raise, remind or resolve the fleet's alert."""

from __future__ import annotations

from config.schedule import SWEEP_TASK, VOLUME_TASK
from config.settings import get_settings
from tasks import task_context
from worker import runtime
from worker.app import app


def _enqueue_sweep() -> None:
    # By name, like the beat: a sweep that waited a whole sweep interval is superseded by the beat's own.
    app.send_task(SWEEP_TASK, expires=get_settings().sweep_interval.total_seconds())


@app.task(name=VOLUME_TASK)
def check_volume() -> dict:
    """One fleet-wide volume check; at critical it also enqueues an immediate sweep."""
    with task_context(check_volume):
        return runtime.engine().volume_monitor(enqueue_sweep=_enqueue_sweep).check().to_dict()
