"""The Celery app: `celery -A worker.app worker` / `celery -A worker.app beat`.

Correctness never depends on Celery: every task is idempotent and row claims decide who deletes
what. These settings make delivery reliable and cheap; each says why.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from celery import Celery, signals
from kombu.utils.objects import cached_property

from config.errors import BadInput
from config.logging import configure_logging
from config.schedule import beat_schedule
from config.settings import Settings, get_settings
from worker.broker import TRANSPORT as BROKER_TRANSPORT

# Hard limit on a single task. Redis redelivers an unacknowledged message after its visibility
# timeout; the limits stay well below it so a slow task is never run twice concurrently by redelivery.
VISIBILITY_TIMEOUT_S = 3600
TASK_TIME_LIMIT_S = 1800
TASK_SOFT_TIME_LIMIT_S = 1500
# A sweep task stops claiming new batches after this long and leaves the rest to the next beat,
# so it finishes far inside the soft limit.
SWEEP_TASK_BUDGET_S = 600


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def metrics_directory(parent: Path, pid: int) -> Path:
    """A fresh directory for the multiprocess files of process `pid` and its pool, under `parent`.

    One per process tree, because every process that loads the app (the worker, but also beat, the
    operator's `media-retention` and `celery inspect` on the same machine and data dir) prepares
    one: a shared directory emptied at each start would wipe a running worker's counters. Directories
    of processes that are gone, and files of the older flat layout, are removed.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for entry in parent.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            if int(entry.name) == pid or not _process_alive(int(entry.name)):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            entry.unlink(missing_ok=True)
    directory = parent / str(pid)
    directory.mkdir()
    return directory


def _prepare_multiprocess_metrics(parent: Path) -> bool:
    """Point prometheus-client at a fresh directory so pool processes count into shared files.

    prometheus-client picks its value store when first imported, so this runs before the task
    modules (and `worker.metrics`) are imported; it declines once that has happened (`run`'s solo
    pool has one process and needs no files).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return True
    if "prometheus_client" in sys.modules:
        return False
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_directory(parent, os.getpid()))
    return True


class _Celery(Celery):
    """Celery whose worker and beat programs log their banners and shutdown as events in JSON log format."""

    @cached_property
    def Worker(self):
        return self.subclass_with_self("worker.celery_programs:Worker")

    @cached_property
    def Beat(self):
        return self.subclass_with_self("worker.celery_programs:Beat")


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if settings.metrics_port:
        _prepare_multiprocess_metrics(settings.data_dir / "prometheus")
    app = _Celery("media_retention", include=["tasks.sweep", "tasks.volume", "tasks.reconcile", "tasks.tombstones"])
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
        # The embedded broker writes each message whole before a consumer can see it (worker/broker.py).
        broker_transport=BROKER_TRANSPORT if settings.embedded_broker else None,
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
        # Task events (sent, received, started, succeeded, failed) so `celery events` and Flower see the
        # work as it happens. On Redis they are PUBLISHed: nothing is stored when nobody listens. Not on
        # the embedded broker: its fanout writes a file per event for every queue ever bound to the event
        # exchange, and the binding of a `celery events` that has exited stays, so the directory would grow.
        worker_send_task_events=not settings.embedded_broker,
        task_send_sent_event=not settings.embedded_broker,
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        # Celery's scheduler that also touches a heartbeat file for beat's liveness probe (worker/beat.py).
        beat_scheduler="worker.beat:HeartbeatScheduler",
        timezone="UTC",
    )
    app.conf.media_retention_settings = settings
    return app


def configure_process_logging(settings: Settings) -> None:
    from config.redact import redact_text, remember_settings

    remember_settings(settings)
    configure_logging(settings.log_format, settings.log_level, redact=redact_text)


@signals.setup_logging.connect
def _setup_logging(**_kwargs) -> None:
    configure_process_logging(get_settings())


@signals.worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    from celery.utils.log import current_process_index

    from worker import runtime

    runtime.reset()
    # One expiry watch per worker node: in its first pool process (index 0, reused when that process is
    # replaced), or in the worker itself under the solo pool (no index). More would only contend for
    # the same due rows; a fleet's nodes share them by row claims.
    if current_process_index(base=0) in (None, 0):
        runtime.start_watch()


@signals.worker_init.connect
def _serve_metrics(**_kwargs) -> None:
    """The worker's main process serves /metrics for itself and its pool processes."""
    settings = get_settings()
    if settings.metrics_port:
        from worker import exporter, runtime

        configure_process_logging(settings)  # worker_init comes before Celery's logging setup

        exporter.serve(runtime.engine().db, settings.metrics_port)
        runtime.reset()  # the pool forks after this: children must not inherit its connections


@signals.worker_process_shutdown.connect
def _process_gone(pid: int | None = None, **_kwargs) -> None:
    from worker import runtime

    runtime.stop_watch()
    if get_settings().metrics_port and pid:
        from worker import exporter

        exporter.process_exited(pid)


@signals.worker_shutdown.connect
def _worker_gone(**_kwargs) -> None:
    """The solo pool (`media-retention run`) sends no process shutdown: stop its watch here."""
    from worker import runtime

    runtime.stop_watch()


def _app_or_exit() -> Celery:
    """The app; a malformed setting stops `celery -A worker.app ...` with one sentence and exit 2,
    as the command line does, instead of an import traceback."""
    try:
        return create_app()
    except BadInput as exc:
        sys.stderr.write(f"media-retention: {exc}\n")
        raise SystemExit(2) from None


app = _app_or_exit()
