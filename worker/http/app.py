"""`GET /v1/media/{id}` for upstream services in any language, scoped by org API keys.

The app renders what one seam answers (`KeyedLookups.answer`, worker/catalog/keyed_lookup.py: the key and
the item in one database round trip): an `Item` while active (200), a `Tombstone` once claimed, deleted or
expired, or nothing (404 either way, the body built by `worker.responses` like the CLI's). Another org's
media is answered exactly like media never seen, so a key cannot even learn that an ID exists elsewhere.

The lookup route is the hot path and is answered by `LookupRoute` (worker/http/lookup_route.py) ahead of
FastAPI's routing; FastAPI describes it (/openapi.json, from the models below) and serves everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Literal, Protocol

import structlog
from fastapi import Depends, FastAPI, Path, Request
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.catalog.keyed_lookup import KeyedAnswer
from worker.catalog.results import Item, Variant
from config.errors import BadInput
from config.logging import hot_path_logger
from worker.http.lookup_route import (
    LOOKUP_PATH,
    RETRY_AFTER_SECONDS,
    UNAVAILABLE_MESSAGE,
    LookupRoute,
    answer_lookup,
)
from worker.models import ID_LENGTH
from worker.store.keys import ID_PATTERN, QUOTED_MAX

log = structlog.get_logger("worker.http")

# Lookups are one primary-key read: most answer in a few milliseconds, so the buckets are fine at the
# low end and stop at 5 s, past any timeout a caller would keep waiting.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Scrapes and probes come every few seconds: logged at DEBUG, so the INFO log holds the lookups.
QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})


class KeyedLookups(Protocol):
    """The one question the HTTP layer asks the engine (worker.catalog.keyed_lookup.KeyedLookup)."""

    async def answer(self, token: str | None, media_id: str) -> KeyedAnswer: ...

    @property
    def can_presign(self) -> bool: ...

    def sign(self, item: Item) -> tuple[str, datetime] | None: ...

    def sign_variants(self, item: Item) -> tuple[Variant, ...]: ...

    async def close(self) -> None: ...


# -- response bodies (they are the OpenAPI description's schemas) ------------------------------------


class VariantBody(BaseModel):
    key: str
    size: int
    mime: str
    # A presigned GET URL on an object store (absent on a filesystem store), capped exactly like the item's.
    url: str | None = None


class MediaItemBody(BaseModel):
    id: str
    org: str
    key: str
    size: int
    mime: str | None
    sha256: str | None
    created_at: datetime
    ttl_seconds: int | None
    expires_at: datetime
    state: Literal["active"]
    held: bool
    # A presigned GET URL on an object store (null on a filesystem store), valid until url_expires_at,
    # never past the item's expiry.
    url: str | None = None
    url_expires_at: datetime | None = None
    # The item's derived blobs (thumbnails, previews), each with its own URL on an object store.
    variants: list[VariantBody] = []


class GoneBody(BaseModel):
    id: str
    status: Literal[404]
    error: Literal["gone"]
    reason: str | None
    deleted_at: datetime
    state: Literal["deleting", "deleted", "expired"]


class NotFoundBody(BaseModel):
    id: str
    status: Literal[404]
    error: Literal["not_found"]


class ErrorBody(BaseModel):
    status: int
    error: str
    message: str


class HealthBody(BaseModel):
    status: str


def _error(status: int, error: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"status": status, "error": error, "message": message}, status_code=status, headers=headers)


# -- metrics and the access log ------------------------------------------------------------------------


class _CatalogUp:
    """`media_retention_http_catalog_up`, asked at scrape time: a series every replica exports from its
    start (the request counters appear only with the first request), so an alert can tell a lookup
    service that is gone from one that is idle, and one that cannot reach its database."""

    def __init__(self, ping: Callable[[], None]):
        self.ping = ping

    def collect(self):
        try:
            self.ping()
            up = 1
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database does not
            log.warning("http.catalog_unavailable", error_type=type(exc).__name__)
            up = 0
        yield GaugeMetricFamily("media_retention_http_catalog_up", "1 when the catalog database answered this scrape.",
                                value=up)


class _Instrumented:
    """Counts and times every request by route template (never by raw path: IDs would explode the series),
    and writes the access log line: method, route, status, duration, org — never a header."""

    def __init__(self, app, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("media_retention_http_requests_total", "HTTP requests answered, by route and status.",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("media_retention_http_request_duration_seconds", "Time to answer an HTTP request.",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry)
        # Made here, after the CLI configured logging: the access log's own fast writer (config.logging).
        self.access_log = hot_path_logger("worker.http")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(elapsed)
            state = scope.get("state") or {}
            write = self.access_log.debug if route in QUIET_ROUTES else self.access_log.info
            write("http.request", method=scope["method"], route=route, path=_logged_path(scope["path"]), status=status,
                     duration_ms=round(elapsed * 1000, 2), org=state.get("org"))


def _logged_path(path: str) -> str:
    """The request path as logged: cut past QUOTED_MAX characters after the route's prefix, so a 100 KB
    URL is a one-line log entry that still shows what it was."""
    limit = len("/v1/media/") + QUOTED_MAX
    return path if len(path) <= limit else f"{path[:limit]}\u2026 ({len(path)} characters)"


# -- the app -----------------------------------------------------------------------------------------------


def create_app(*, lookups: KeyedLookups, ping: Callable[[], None]) -> FastAPI:
    """The ASGI app. `ping` raises when the database is unreachable (for /readyz)."""

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await lookups.close()

    app = FastAPI(
        title="media-retention lookup",
        version="1",
        description="Look media up by ID with an org-scoped API key: 200 while active, 404 from its expiry "
                    "(unless held), once it was purged, or if it belongs to another org.",
        lifespan=lifespan,
    )
    registry = CollectorRegistry()
    registry.register(_CatalogUp(ping))
    bearer = HTTPBearer(auto_error=False, description="An org API key from `media-retention apikey create`.")

    @app.exception_handler(BadInput)
    async def bad_input(_request, exc: BadInput) -> JSONResponse:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, _exc) -> JSONResponse:
        return _error(400, "bad_request", "the request is malformed.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "not_found" if exc.status_code == 404 else "http_error", str(exc.detail),
                      headers=getattr(exc, "headers", None))

    # The database unreachable (a connection refused or cut, the pool exhausted): the service is unavailable,
    # as /readyz says, and the caller should retry; not an internal error of ours.
    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(_request, exc: Exception) -> JSONResponse:
        log.warning("http.database_unavailable", error_type=type(exc).__name__)
        return _error(503, "unavailable", UNAVAILABLE_MESSAGE, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception) -> JSONResponse:
        # The type only: a driver's message can quote a connection URL.
        log.error("http.server_error", error_type=type(exc).__name__)
        return _error(500, "internal_error", "the lookup failed; see the service log.")

    @app.get(
        LOOKUP_PATH,
        response_model=MediaItemBody,
        summary="Look up a media item",
        responses={
            400: {"model": ErrorBody, "description": "The ID is malformed."},
            401: {"model": ErrorBody, "description": "No API key, or one that is unknown or revoked."},
            404: {"model": GoneBody | NotFoundBody,
                  "description": "Gone (expired, claimed for deletion or deleted), never seen, or another org's."},
            503: {"model": ErrorBody, "description": "The catalog database cannot be reached; retry after Retry-After."},
        },
    )
    async def get_media(request: Request, media_id: str = Path(
            description=f"The media ID: 1-{ID_LENGTH} of A-Za-z0-9._-, without '..', not only dots.",
            # Declared for clients, checked by the lookup itself (worker.store.keys.validate_id), whose
            # sentence the 400 carries; pydantic's regex engine has no lookahead to check it with.
            json_schema_extra={"minLength": 1, "maxLength": ID_LENGTH, "pattern": ID_PATTERN}),
                        credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        # GET requests are answered by LookupRoute before FastAPI routes them; this endpoint describes the route
        # in /openapi.json and answers the same way (the same function) where the app runs without it.
        answered = await answer_lookup(lookups, f"Bearer {credentials.credentials}" if credentials else None, media_id)
        if answered.org is not None:
            request.scope.setdefault("state", {})["org"] = answered.org
        return Response(answered.body, status_code=answered.status, headers=dict(answered.headers),
                        media_type="application/json")

    @app.get("/healthz", response_model=HealthBody, summary="The process is up")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=HealthBody, summary="The database is reachable",
             responses={503: {"model": ErrorBody, "description": "The database cannot be reached."}})
    def readyz():
        try:
            ping()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the database means "not ready"
            log.warning("http.not_ready", error_type=type(exc).__name__)
            return _error(503, "unavailable", "the catalog database cannot be reached.")
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics_registry = registry
    [route] = [route for route in app.routes if isinstance(route, APIRoute) and route.path == LOOKUP_PATH]
    # Added last, so outermost: every request is counted, timed and logged, lookups included.
    app.add_middleware(LookupRoute, lookups=lookups, route=route)
    app.add_middleware(_Instrumented, registry=registry)
    return app


def database_ping(db) -> Callable[[], None]:
    def ping() -> None:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return ping
