"""Sweep, drain and purge tasks: each binds its context and calls into `worker/`."""

from __future__ import annotations

import socket
import time

from config.schedule import DRAIN_TASK, PURGE_TASK, SCHEDULED_SWEEP_TASK, SWEEP_TASK, expires_after
from tasks import task_context
from worker import runtime
from worker.app import SWEEP_TASK_BUDGET_S, app


def _deadline() -> float:
    return time.monotonic() + SWEEP_TASK_BUDGET_S


@app.task(name=SCHEDULED_SWEEP_TASK)
def scheduled_sweep() -> dict:
    """Beat's sweep: once per schedule slot fleet-wide; a large backlog is shared out as drains."""
    with task_context(scheduled_sweep):
        runs = runtime.engine().runs

        def send_drains(run_id: int, count: int) -> None:
            for _ in range(count):
                # A drain that waited a whole interval (at least MIN_EXPIRES_S) is superseded by the next sweep.
                drain.apply_async(kwargs={"run_id": run_id}, expires=expires_after(runs.interval.total_seconds()))

        counts = runs.scheduled(worker=scheduled_sweep.request.hostname or socket.gethostname(), deadline=_deadline(),
                                send_drains=send_drains)
        return {"skipped": "slot_taken"} if counts is None else counts.to_dict()


@app.task(name=DRAIN_TASK)
def drain(run_id: int) -> dict:
    """A helper's share of a scheduled sweep's backlog; row claims keep the shares disjoint."""
    with task_context(drain, run_id=run_id):
        return runtime.engine().runs.drain(run_id, deadline=_deadline()).to_dict()


@app.task(name=SWEEP_TASK)
def sweep(limit: int | None = None) -> dict:
    """One sweep now, outside the schedule (operators' `sweep --enqueue`, critical volume alerts)."""
    with task_context(sweep):
        return runtime.engine().runs.manual(worker=sweep.request.hostname, limit=limit, deadline=_deadline()).to_dict()


@app.task(name=PURGE_TASK)
def purge(ids: list[str] | None = None, org: str | None = None, actor: str | None = None) -> dict:
    with task_context(purge, org=org):
        return runtime.engine().catalog.purge(ids=ids or (), org=org, actor=actor).to_dict()
