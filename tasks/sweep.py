"""Sweep, drain and purge tasks: each binds its context and calls into `worker/`."""

from __future__ import annotations

import socket
import time

import structlog

from config.schedule import DRAIN_TASK, PURGE_TASK, SCHEDULED_SWEEP_TASK, SWEEP_TASK
from config.settings import get_settings
from worker import runtime, status
from tasks import task_context
from worker.app import SWEEP_TASK_BUDGET_S, app


def _deadline() -> float:
    return time.monotonic() + SWEEP_TASK_BUDGET_S


@app.task(name=SCHEDULED_SWEEP_TASK)
def scheduled_sweep() -> dict:
    """Beat's sweep: once per schedule slot fleet-wide; a large backlog is shared out as drains."""
    with task_context(scheduled_sweep):
        settings = get_settings()
        catalog = runtime.catalog()
        interval = settings.sweep_interval.total_seconds()
        run_id = status.start_run(catalog.db, kind="scheduled", worker=scheduled_sweep.request.hostname or socket.gethostname(),
                               interval_seconds=interval)
        if run_id is None:
            return {"skipped": "slot_taken"}
        fanout = status.plan_fanout(status.due_count(catalog.db), settings.sweep_batch_size, settings.sweep_fanout_max)
        for _ in range(fanout):
            # Drains expire with the slot: a drain that waited a whole interval is superseded by the next sweep.
            drain.apply_async(kwargs={"run_id": run_id}, expires=interval)
        if fanout:
            structlog.get_logger("tasks.sweep").info("sweep.fanned_out", run_id=run_id, drains=fanout)
        counts = catalog.sweeper.sweep(deadline=_deadline())
        status.add_counts(catalog.db, run_id, counts, finished=True, fanout=fanout)
        return counts.to_dict()


@app.task(name=DRAIN_TASK)
def drain(run_id: int) -> dict:
    """A helper's share of a scheduled sweep's backlog; row claims keep the shares disjoint."""
    with task_context(drain, run_id=run_id):
        catalog = runtime.catalog()
        counts = catalog.sweeper.drain(deadline=_deadline())
        status.add_counts(catalog.db, run_id, counts)
        return counts.to_dict()


@app.task(name=SWEEP_TASK)
def sweep(limit: int | None = None) -> dict:
    """One sweep now, outside the schedule (operators' `sweep --enqueue`, critical volume alerts)."""
    with task_context(sweep):
        catalog = runtime.catalog()
        run_id = status.start_run(catalog.db, kind="manual", worker=sweep.request.hostname)
        counts = catalog.sweeper.sweep(limit=limit, deadline=_deadline())
        status.add_counts(catalog.db, run_id, counts, finished=True)
        return counts.to_dict()


@app.task(name=PURGE_TASK)
def purge(ids: list[str] | None = None, org: str | None = None, actor: str | None = None) -> dict:
    with task_context(purge, org=org):
        return runtime.catalog().purge(ids=ids or (), org=org, actor=actor)
