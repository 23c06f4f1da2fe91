"""Test-only: answers chosen S3 requests of *this process* with a fault, at botocore's `before-send`
hook (the last step before the socket), so retries and backoff above it run for real.

Loaded by Python at start-up when this directory is on PYTHONPATH (tests/faults/test_s3_faults.py puts
it there for the `media-retention` subprocess only). The schedule comes from the environment:
MEDIA_RETENTION_TEST_S3_FAULTS = {"DeleteObjects": {"1": "500", "2": "slowdown"}} (1-based send numbers
of that operation, retries included); each injected fault is appended to MEDIA_RETENTION_TEST_S3_FAULT_LOG.
"""

import json
import os

_PLAN = json.loads(os.environ.get("MEDIA_RETENTION_TEST_S3_FAULTS", "{}"))
_LOG = os.environ.get("MEDIA_RETENTION_TEST_S3_FAULT_LOG")

if _PLAN:
    import threading
    from collections import Counter

    import botocore.session
    from botocore.awsrequest import AWSResponse

    _sent: Counter = Counter()
    _lock = threading.Lock()
    _BODIES = {
        "500": (500, b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"),
        "slowdown": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
    }

    class _Raw:
        def __init__(self, body: bytes):
            self._body = body

        def stream(self, **_):
            yield self._body

    def _before_send(request, **kwargs):
        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        with _lock:  # two batches' deletes may be on the wire at once: number each send exactly once
            _sent[operation] += 1
            number = _sent[operation]
        fault = _PLAN.get(operation, {}).get(str(number))
        if fault is None:
            return None
        if _LOG:
            with _lock, open(_LOG, "a") as log:
                log.write(f"{operation} {number} {fault}\n")
        status, body = _BODIES[fault]
        return AWSResponse(request.url, status, {"Content-Type": "application/xml", "Content-Length": str(len(body))}, _Raw(body))

    _create_client = botocore.session.Session.create_client

    def create_client(self, *args, **kwargs):
        client = _create_client(self, *args, **kwargs)
        client.meta.events.register("before-send.s3", _before_send)
        return client

    botocore.session.Session.create_client = create_client
