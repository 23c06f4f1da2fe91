"""Alembic migrations; run them with `media-retention db upgrade` (see `worker.schema`)."""
