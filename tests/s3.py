"""S3 fixtures: moto's threaded server speaking the real S3 protocol on loopback, started once a session.

Stores under test talk to it over HTTP like to any S3-compatible endpoint. Faults the server cannot
produce on demand (503 SlowDown, a reset connection) are injected at botocore's `before-send` hook,
the last step before the socket: everything above it (parsing, botocore's retries, our backoff) runs
for real.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ConnectionClosedError
from urllib3.exceptions import ProtocolError

from config.settings import Settings, load_settings
from tests.conftest import free_port
from worker.catalog import Catalog
from worker.engine import build
from worker.db import Database
from worker.store import MARKER_NAME
from worker.store.s3 import S3Store

# moto keeps every account's buckets in memory, in this process: seeding thousands of objects through
# its backend takes milliseconds where PutObject over HTTP takes seconds. Only setup goes this way;
# everything under test goes over the wire.
MOTO_ACCOUNT = "123456789012"
PREFIX = "media"



@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1, with throwaway credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        # werkzeug logs every request at INFO; thousands of lines would drown a failure's output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def raw_s3(s3_endpoint: str):
    """A plain boto3 client for setting up and inspecting buckets (never the store under test)."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint, config=Config(max_pool_connections=16, request_checksum_calculation="when_required")
    )
    yield client
    client.close()


@pytest.fixture
def bucket(raw_s3) -> str:
    """A new empty bucket for this test."""
    name = f"t-{secrets.token_hex(6)}"
    raw_s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def make_store(s3_endpoint: str, bucket: str) -> Iterator[Callable[..., S3Store]]:
    """Build S3 stores on the test bucket (prefix `media` unless told); all are closed afterwards."""
    stores: list[S3Store] = []

    def build(prefix: str = PREFIX, **options) -> S3Store:
        options.setdefault("delete_threads", 4)
        # Our own throttle backoff is 1 s, 2 s, 4 s in production; 10 ms keeps fault tests fast while
        # still going through the same sleep-and-retry path.
        options.setdefault("throttle_backoff", 0.01)
        store = S3Store(bucket, prefix, endpoint_url=s3_endpoint, **options)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


@pytest.fixture
def s3_store(make_store) -> S3Store:
    return make_store()


def s3_settings_for(tmp_path: Path, database: Database, bucket: str, endpoint: str, **overrides) -> Settings:
    values = dict(data_dir=tmp_path / "data", database_url=database.url, storage_url=f"s3://{bucket}/{PREFIX}",
                  s3_endpoint_url=endpoint, sweep_batch_size=50, delete_threads=4)
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def s3_catalog(tmp_path: Path, database: Database, bucket: str, s3_endpoint: str, s3_store: S3Store) -> Catalog:
    """A catalog on `s3://<bucket>/media` (runs on SQLite and on PostgreSQL, like `database`), bound to its store."""
    engine = build(s3_settings_for(tmp_path, database, bucket, s3_endpoint), database=database, store=s3_store)
    engine.binding.ensure()
    return engine.catalog


@pytest.fixture
def pg_s3_catalog(tmp_path: Path, pg_database: Database, bucket: str, s3_endpoint: str, s3_store: S3Store) -> Catalog:
    """The same on PostgreSQL only, for tests whose subject is the store, not the database."""
    engine = build(s3_settings_for(tmp_path, pg_database, bucket, s3_endpoint), database=pg_database, store=s3_store)
    engine.binding.ensure()
    return engine.catalog


class Objects:
    """Seeds and inspects a bucket straight in moto's in-process backend (setup and checks only)."""

    def __init__(self, raw_s3):
        from moto.s3.models import s3_backends

        self._backend = s3_backends[MOTO_ACCOUNT]["aws"]
        self.raw = raw_s3

    def put(self, bucket: str, names: list[str], body: bytes = b"x" * 10, *, age: timedelta | None = None) -> None:
        """Objects with `body`; with `age`, last written that long ago (as LastModified reports it)."""
        for name in names:
            stored = self._backend.put_object(bucket, name, body)
            if age is not None:
                stored.last_modified = stored.last_modified - age

    def writer(self, bucket: str, prefix: str = PREFIX) -> Callable[[str, bytes], None]:
        """(key, bytes) -> None writing the store's blob at `prefix/key`: how `tests.factories.seed_items`
        puts blobs on S3 fast."""
        return lambda key, body: self.put(bucket, [f"{prefix}/{key}" if prefix else key], body)

    def names(self, bucket: str, prefix: str = "") -> set[str]:
        """The names of the objects under `prefix`: blobs, not the store's binding marker."""
        found: set[str] = set()
        for page in self.raw.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update(entry["Key"] for entry in page.get("Contents", []) if entry["Key"].rpartition("/")[2] != MARKER_NAME)
        return found


@pytest.fixture
def objects(raw_s3) -> Objects:
    return Objects(raw_s3)


class Faults:
    """Counts what a store's client sends and, when armed, answers some sends with a fault instead.

    `plan[operation]` maps the 1-based number of a send of that operation (retries count) to a fault:
    "slowdown" answers 503 SlowDown without reaching the server; "reset" drops the connection before
    the server sees the request; "reset_after" delivers the request, then drops the connection before
    the answer arrives (the server did the work, the client never heard).

    `poison[operation] = (marker, fault, times)` answers the first `times` sends of that operation whose
    body holds `marker` with `fault`, whatever their number: a sweep keeps two deletes in flight, so
    numbers alone do not say which batch a send belongs to.
    """

    def __init__(self, store: S3Store):
        self.sent: Counter[str] = Counter()
        self.plan: dict[str, dict[int, str]] = {}
        self.poison: dict[str, tuple[bytes, str, int]] = {}
        self._http = urllib3.PoolManager()
        store.client.meta.events.register("before-send.s3", self._before_send)

    def _before_send(self, request, **kwargs):
        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        self.sent[operation] += 1
        fault = self.plan.get(operation, {}).get(self.sent[operation])
        if operation in self.poison:
            marker, poison, times = self.poison[operation]
            if times and marker in (request.body or b""):
                fault = poison
                self.poison[operation] = (marker, poison, times - 1)
        if fault == "slowdown":
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message></Error>")
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml", "Content-Length": str(len(body))}, _Raw(body))
        if fault in ("reset", "reset_after"):
            if fault == "reset_after":
                self._http.request(request.method, request.url, body=request.body, headers=dict(request.headers))
            reset = ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
            # Exactly what botocore raises when urllib3 reports a reset connection.
            raise ConnectionClosedError(error=reset, request=request, endpoint_url=request.url)
        return None


class _Raw:
    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_):
        yield self._body


@pytest.fixture
def faults(s3_store: S3Store) -> Faults:
    return Faults(s3_store)
