"""Sweep and purge tasks."""

from __future__ import annotations

import time

import structlog

from config.schedule import PURGE_TASK, SWEEP_TASK
from worker import runtime
from worker.app import SWEEP_TASK_BUDGET_S, app


@app.task(name=SWEEP_TASK)
def sweep(limit: int | None = None) -> dict:
    structlog.contextvars.bind_contextvars(task_id=sweep.request.id, task="sweep")
    try:
        counts = runtime.catalog().sweeper.sweep(limit=limit, deadline=time.monotonic() + SWEEP_TASK_BUDGET_S)
        return counts.to_dict()
    finally:
        structlog.contextvars.clear_contextvars()


@app.task(name=PURGE_TASK)
def purge(ids: list[str] | None = None, org: str | None = None, actor: str | None = None) -> dict:
    structlog.contextvars.bind_contextvars(task_id=purge.request.id, task="purge", org=org)
    try:
        return runtime.catalog().purge(ids=ids or (), org=org, actor=actor)
    finally:
        structlog.contextvars.clear_contextvars()
