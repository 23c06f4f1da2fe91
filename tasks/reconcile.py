"""Reconcile task: `reconcile --enqueue` runs it on a worker."""

from __future__ import annotations

from datetime import timedelta

from config.schedule import RECONCILE_TASK
from tasks import task_context
from worker import runtime
from worker.app import app


@app.task(name=RECONCILE_TASK)
def reconcile(grace_seconds: int, max_orphans: int, max_missing: int, actor: str, dry_run: bool = False,
              allow_mass_drift: bool | None = None) -> dict:
    with task_context(reconcile):
        report = runtime.engine().reconciler.run(
            grace=timedelta(seconds=grace_seconds), dry_run=dry_run, max_orphans=max_orphans, max_missing=max_missing,
            allow_mass_drift=bool(allow_mass_drift), actor=actor)
        return report.to_dict()
