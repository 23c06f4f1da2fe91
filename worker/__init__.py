"""media-retention: the engine. Nothing in this package imports Celery except `worker.app`."""
