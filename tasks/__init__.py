"""Thin Celery tasks: each binds its context and calls into `worker/`."""
