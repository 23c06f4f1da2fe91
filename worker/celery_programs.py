"""Celery's worker and beat programs, with what they print turned into log events in JSON log format.

Celery prints an ASCII banner when a worker or beat starts and writes "worker: Warm shutdown" straight
to the terminal; in a JSON log stream each such line breaks a line-by-line parser (jq, Loki, Fluent
Bit). The app (worker/app.py) names these subclasses as its `Worker` and `Beat`, so `celery -A
worker.app worker|beat` and `media-retention run` use them. On a console everything stays as Celery
prints it.
"""

from __future__ import annotations

import structlog
from celery import VERSION_BANNER, signals
from celery.apps import beat as celery_beat
from celery.apps import worker as celery_worker

from config.redact import redact_url

log = structlog.get_logger("worker.celery")


def _json_logs(app) -> bool:
    return app.conf.media_retention_settings.log_format == "json"


def _configure_logging(app) -> None:
    # Imported here: worker.app names this module's classes, and loads it only when a program starts.
    from worker.app import configure_process_logging

    configure_process_logging(app.conf.media_retention_settings)


def _broker(app) -> str:
    return redact_url(app.connection_for_write().as_uri())


def _say_as_event(message: str, *_args, **_kwargs) -> None:
    """What Celery's signal handlers would write to the terminal (the Ctrl+C hints, a restart), as an event."""
    log.warning("celery.notice", message=" ".join(str(message).split()))


def _shutting_down(sig: str = "", how: str = "", exitcode: int = 0, **_kwargs) -> None:
    log.info("worker.shutting_down", how=how.lower(), signal=sig, exitcode=exitcode)


class Worker(celery_worker.Worker):
    """`celery worker`: its start as one `worker.starting` event and its shutdown as `worker.shutting_down`."""

    def on_before_init(self, **kwargs):
        if _json_logs(self.app):
            # Logging first: Celery's check of the user (a SecurityWarning as root) comes before its own setup.
            _configure_logging(self.app)
            # Every message Celery's signal handlers write to the terminal goes through this one function.
            celery_worker.safe_say = _say_as_event
            signals.worker_shutting_down.connect(_shutting_down, weak=False, dispatch_uid="worker.celery_programs")
        super().on_before_init(**kwargs)

    def emit_banner(self):
        if not _json_logs(self.app):
            return super().emit_banner()
        pool = self.pool_cls if isinstance(self.pool_cls, str) else self.pool_cls.__module__
        log.info("worker.starting", hostname=self.hostname, celery=VERSION_BANNER, broker=_broker(self.app),
                 concurrency=self.concurrency, pool=pool.rsplit(".", 1)[-1], queues=sorted(self.app.amqp.queues),
                 tasks=sorted(name for name in self.app.tasks if not name.startswith("celery.")))
        return None

    def install_platform_tweaks(self, worker):
        super().install_platform_tweaks(worker)
        if _json_logs(self.app):
            # The same handlers without their "worker: Warm shutdown (MainProcess)" line; the
            # worker_shutting_down signal they send logs it as an event instead.
            celery_worker.install_worker_term_handler(worker, verbose=False)
            celery_worker.install_worker_term_hard_handler(worker, verbose=False)
            celery_worker.install_worker_int_handler(worker, verbose=False)


class Beat(celery_beat.Beat):
    """`celery beat`: its start as one `beat.starting` event instead of the banner."""

    def run(self) -> None:
        if _json_logs(self.app):
            self.quiet = True
            _configure_logging(self.app)
            log.info("beat.starting", celery=VERSION_BANNER, broker=_broker(self.app), scheduler=str(self.scheduler_cls),
                     schedule=self.schedule, max_interval_s=self.max_interval)
        super().run()
