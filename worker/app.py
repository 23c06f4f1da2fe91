"""The Celery app: `celery -A worker.app worker` / `celery -A worker.app beat`.

Correctness never depends on Celery: every task is idempotent and row claims decide who deletes
what. These settings make delivery reliable and cheap; each says why.
"""

from __future__ import annotations

from celery import Celery, signals

from config.logging import configure_logging
from config.schedule import beat_schedule
from config.settings import Settings, get_settings

# Hard limit on a single task. Redis redelivers an unacknowledged message after its visibility
# timeout; the limits stay well below it so a slow task is never run twice concurrently by redelivery.
VISIBILITY_TIMEOUT_S = 3600
TASK_TIME_LIMIT_S = 1800
TASK_SOFT_TIME_LIMIT_S = 1500
# A sweep task stops claiming new batches after this long and leaves the rest to the next beat,
# so it finishes far inside the soft limit.
SWEEP_TASK_BUDGET_S = 600


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("media_retention", include=["tasks.sweep", "tasks.volume"])
    transport_options: dict = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    if settings.embedded_broker:
        queue_dir, control_dir = settings.broker_dir / "queue", settings.broker_dir / "control"
        for directory in (queue_dir, control_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # The filesystem transport is a queue in a directory: no server, one machine.
        transport_options = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),
            "store_processed": False,
        }
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # JSON only: a pickled message could run arbitrary code in the worker, so it is refused.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Acknowledge after the task ran, and requeue if its process died, so a crash loses no work.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a long sweep never sits on prefetched work others could do.
        worker_prefetch_multiplier=1,
        task_time_limit=TASK_TIME_LIMIT_S,
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
        # Nobody reads task results; counts go to logs and metrics.
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        timezone="UTC",
    )
    app.conf.media_retention_settings = settings
    return app


@signals.setup_logging.connect
def _setup_logging(**_kwargs) -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


@signals.worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    from worker import runtime

    runtime.reset()


app = create_app()
