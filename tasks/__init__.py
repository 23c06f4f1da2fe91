"""Thin Celery tasks: each binds its context and calls into `worker/`."""

from __future__ import annotations

import contextlib

import structlog


@contextlib.contextmanager
def task_context(task, **fields):
    """Bind the task's id and name (plus `fields`) to every log event inside, and clear them after."""
    structlog.contextvars.bind_contextvars(task_id=task.request.id, task=task.name.rpartition(".")[2], **fields)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
