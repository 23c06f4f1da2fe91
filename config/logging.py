"""structlog setup: readable on a console, one JSON object a line in production.

Celery and other libraries log through the standard library; their records go through the same
renderer, so a production log stream is JSON all the way through. What Celery prints rather than logs
(its banners, "Warm shutdown") is turned into events by its program classes (worker/celery_programs.py).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

_SHARED: list = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


# The format logging was last configured with; None before (settings that failed to load, for one).
_configured_format: str | None = None
# The stderr handler and the renderer's processors `configure_logging` installed, for `hot_path_logger`.
_handler: logging.Handler | None = None
_render: list = []


def operator_line(message: str) -> str:
    """A line the command line writes to stderr for the operator, as it goes out in the configured format.

    In JSON log format it is an event like every other line of the stream (`cli.message`, with the line as
    `message`): level `error` for the contract's sentences (`media-retention: ...`, what failed and why),
    `info` for hints. It is written whatever the log level: an operator's sentence is never filtered out."""
    if _configured_format != "json":
        return message
    level = "error" if message.startswith("media-retention: ") else "info"
    timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"event": "cli.message", "message": message, "level": level, "logger": "worker.cli", "timestamp": timestamp})


def configure_logging(log_format: str = "console", level: str = "INFO", redact: Callable[[str], str] | None = None) -> None:
    """Send every log line to stderr (stdout stays for machine-readable command output).

    `redact` is applied to each rendered line, tracebacks included, whoever logged it (ours,
    Celery, kombu, botocore, requests): the last guard before a secret reaches a log."""
    global _configured_format, _handler, _render
    _configured_format = log_format
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        extra = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        extra = []
    _render = [*extra, renderer, *([lambda _logger, _name, line: redact(line)] if redact else [])]
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_render],
        )
    )
    _handler = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A record of a logger without handlers that does not propagate would go to logging's bare "last resort"
    # handler as plain text; billiard's pool logger ("multiprocessing": a pool process that exited) is one.
    logging.lastResort = handler
    pool = logging.getLogger("multiprocessing")
    pool.handlers[:] = [handler]
    pool.setLevel(logging.WARNING)
    # Library warnings (Celery's SecurityWarning as root, deprecations) become log events instead of
    # free text on stderr; on a console Python's own warning lines stay.
    logging.captureWarnings(log_format == "json")
    # botocore, urllib3 and alembic (its plugins, its migration context) narrate routine steps at INFO; keep them to warnings.
    for noisy in ("botocore", "urllib3", "s3transfer", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _HandlerStream:
    """structlog's logger for `hot_path_logger`: writes each rendered line to the configured handler's stream,
    under the handler's own lock (so it never interleaves with a line the standard library writes)."""

    def __init__(self, handler: logging.StreamHandler):
        self._handler = handler

    def msg(self, line: str) -> None:
        handler = self._handler
        with handler.lock:
            try:
                handler.stream.write(line + "\n")
                handler.flush()
            except (OSError, ValueError):
                # As the standard library's handlers do: a log line that cannot be written (stderr closed, a broken
                # pipe) is lost, never the request that logged it.
                pass

    info = debug = warning = error = critical = exception = msg


def hot_path_logger(name: str):
    """A logger for a line written on every request (the HTTP access log), rendered exactly as every other line
    of the stream (the same fields, level, logger name, timestamp, renderer and redaction) but without the
    standard library's record, handler and formatter machinery, which cost about 150 µs a line: a third of what
    a whole lookup costs. Its level is the one in force for `name` now; before `configure_logging` it is an
    ordinary structlog logger."""
    if _handler is None or not isinstance(_handler, logging.StreamHandler):
        return structlog.get_logger(name)
    level = logging.getLogger(name).getEffectiveLevel()

    def add_logger_name(_logger, _method, event_dict):
        event_dict["logger"] = name
        return event_dict

    return structlog.wrap_logger(
        _HandlerStream(_handler),
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), *_render],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
