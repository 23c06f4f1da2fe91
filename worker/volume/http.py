"""The HTTP transport every notifier that posts shares: one URL, a timeout per attempt, a bounded
number of attempts with growing pauses, and errors that name only the URL's origin (tokens live in
paths, queries and user parts).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import requests
import structlog

from config.redact import credential_secrets, mask_secrets, redact_text
from worker import metrics
from worker.volume import LOGGER

log = structlog.get_logger(LOGGER)

# How much of a refusing answer is searched for our credentials before its start is logged: a secret cut in
# half by the log's 200 characters would no longer be found whole.
BODY_SCANNED = 64 * 1024
# How much of a refusing answer is logged: enough for Alertmanager's reason, short of a whole HTML page.
BODY_LOGGED = 200
# Pause before the second attempt of a POST, doubled for each further one: long enough for a
# restarting receiver or a load balancer to pick a healthy backend, short against the check interval.
RETRY_BACKOFF_SECONDS = 1.0


def url_origin(url: str) -> str:
    """`scheme://host[:port]` of a URL: all of it that may be logged (a token may live in the path,
    the query or the user part)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _redact(message: str, url: str) -> str:
    """`message` without any part of `url` beyond its origin (requests puts the path and query in its errors)."""
    parts = urlsplit(url)
    hidden = [url, parts.path + (f"?{parts.query}" if parts.query else ""), parts.query, parts.path, parts.netloc]
    for part in sorted((p for p in hidden if p and p != "/"), key=len, reverse=True):
        message = message.replace(part, "…")
    return message


class HttpSink:
    """POSTs JSON to one URL with a per-attempt timeout and a bounded number of attempts; never raises.

    `sink` names it in the log events (`volume.<sink>_delivered`, `_attempt_failed`, `_failed`) and in
    the failure counter's label; only the URL's origin is ever logged.
    """

    def __init__(self, url: str, *, sink: str, timeout: float, attempts: int, backoff: float = RETRY_BACKOFF_SECONDS):
        self.url = url
        self.sink = sink
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.target = url_origin(url)

    def _without_credentials(self, text: str, request: requests.PreparedRequest | None) -> str:
        """`text` without any credential this request sent (the URL's, and the Authorization header requests
        made of it or of ~/.netrc), in any encoding, nor the URL beyond its origin."""
        authorization = request.headers.get("Authorization") if request is not None else None
        return redact_text(_redact(mask_secrets(text, credential_secrets(self.url, authorization)), self.url))

    @property
    def worst_case_seconds(self) -> float:
        """How long `send` can take against an endpoint that accepts connections and never answers."""
        return self.attempts * self.timeout + sum(self.backoff * 2 ** i for i in range(self.attempts - 1))

    def send(self, payload: dict | list, *, alert_status: str) -> bool:
        """True once an attempt got a 2xx. Timeouts, connection errors, 5xx, 408 and 429 are retried."""
        error = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            started = time.monotonic()
            retryable = True
            try:
                # No redirects: requests would turn a redirected POST into a GET and drop the body.
                response = requests.post(self.url, json=payload, timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                error = _redact(f"{type(exc).__name__}: {exc}", self.url)
            else:
                if 200 <= response.status_code < 300:
                    log.info(f"volume.{self.sink}_delivered", target=self.target, status=response.status_code,
                             attempt=attempt, alert_status=alert_status, seconds=round(time.monotonic() - started, 3))
                    return True
                # The start of the body says why (Alertmanager names the field it refused). A receiver or proxy that
                # echoes the request would put our credentials in the log: every form of them is masked first.
                body = " ".join(self._without_credentials(response.text[:BODY_SCANNED], response.request).split())
                body = body[:BODY_LOGGED]
                error = f"HTTP {response.status_code}" + (f": {body}" if body else "")
                # Any other 4xx is the same request refused again: retrying cannot help.
                retryable = response.status_code >= 500 or response.status_code in (408, 429)
            log.warning(f"volume.{self.sink}_attempt_failed", target=self.target, attempt=attempt,
                        attempts=self.attempts, error=error, seconds=round(time.monotonic() - started, 3))
            if not retryable:
                break
            if attempt < self.attempts:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        log.error(f"volume.{self.sink}_failed", target=self.target, error=error, attempts=self.attempts,
                  alert_status=alert_status)
        metrics.ALERT_DELIVERY_FAILURES.labels(sink=self.sink).inc()
        return False
