"""`GET /v1/media/{id}` for upstream services in any language, scoped by org API keys.

The app renders what one seam answers (`MediaLookup.find_for_org`, the engine's lookup use case):
an `Item` while active (200), a `Tombstone` once claimed, deleted or expired, or nothing (404 either way,
the body built by `worker.responses` like the CLI's). Another org's media is answered
exactly like media never seen, so a key cannot even learn that an ID exists elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Literal, Protocol

import structlog
from fastapi import Depends, FastAPI, Path, Request
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

from worker.catalog.results import Item, Tombstone
from config.errors import BadInput, Gone
from worker.models import ID_LENGTH
from worker.responses import not_found_body
from worker.store.keys import ID_PATTERN, QUOTED_MAX

log = structlog.get_logger("worker.http")

# Lookups are one primary-key read: most answer in a few milliseconds, so the buckets are fine at the
# low end and stop at 5 s, past any timeout a caller would keep waiting.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Scrapes and probes come every few seconds: logged at DEBUG, so the INFO log holds the lookups.
QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})


# What a 503 asks callers to wait before retrying: a database failover or restart takes seconds.
RETRY_AFTER_SECONDS = 5


class MediaLookup(Protocol):
    """The one question the HTTP layer asks the engine (worker.catalog.lookup.Lookup)."""

    def find_for_org(self, org: str, media_id: str) -> Item | Tombstone | None: ...

    def sign(self, item: Item) -> tuple[str, datetime] | None: ...

    def sign_variants(self, item: Item) -> tuple: ...


class KeyCheck(Protocol):
    def authenticate(self, token: str | None) -> str | None: ...


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


class _Unauthorized(Exception):
    pass


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
            write = log.debug if route in QUIET_ROUTES else log.info
            write("http.request", method=scope["method"], route=route, path=_logged_path(scope["path"]), status=status,
                     duration_ms=round(elapsed * 1000, 2), org=state.get("org"))


def _logged_path(path: str) -> str:
    """The request path as logged: cut past QUOTED_MAX characters after the route's prefix, so a 100 KB
    URL is a one-line log entry that still shows what it was."""
    limit = len("/v1/media/") + QUOTED_MAX
    return path if len(path) <= limit else f"{path[:limit]}\u2026 ({len(path)} characters)"


# -- the app -----------------------------------------------------------------------------------------------


def create_app(*, lookup: MediaLookup, keys: KeyCheck, ping: Callable[[], None]) -> FastAPI:
    """The ASGI app. `ping` raises when the database is unreachable (for /readyz)."""
    app = FastAPI(
        title="media-retention lookup",
        version="1",
        description="Look media up by ID with an org-scoped API key: 200 while active, 404 from its expiry "
                    "(unless held), once it was purged, or if it belongs to another org.",
    )
    registry = CollectorRegistry()
    registry.register(_CatalogUp(ping))
    bearer = HTTPBearer(auto_error=False, description="An org API key from `media-retention apikey create`.")

    def authenticated_org(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        org = keys.authenticate(credentials.credentials if credentials else None)
        if org is None:
            raise _Unauthorized()
        request.scope.setdefault("state", {})["org"] = org
        return org

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_request, _exc) -> JSONResponse:
        return _error(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>.",
                      headers={"WWW-Authenticate": "Bearer"})

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
        return _error(503, "unavailable", "the catalog database cannot be reached; retry later.",
                      headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception) -> JSONResponse:
        # The type only: a driver's message can quote a connection URL.
        log.error("http.server_error", error_type=type(exc).__name__)
        return _error(500, "internal_error", "the lookup failed; see the service log.")

    @app.get(
        "/v1/media/{media_id}",
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
    def get_media(media_id: str = Path(
            description=f"The media ID: 1-{ID_LENGTH} of A-Za-z0-9._-, without '..', not only dots.",
            # Declared for clients, checked by the lookup itself (worker.store.keys.validate_id), whose
            # sentence the 400 carries; pydantic's regex engine has no lookahead to check it with.
            json_schema_extra={"minLength": 1, "maxLength": ID_LENGTH, "pattern": ID_PATTERN}),
                  org: str = Depends(authenticated_org)):
        found = lookup.find_for_org(org, media_id)
        if not isinstance(found, Item):
            return JSONResponse(not_found_body(media_id, found), status_code=404)
        try:
            signed = lookup.sign(found)
            variants = lookup.sign_variants(found)
        except Gone as gone:
            return JSONResponse(not_found_body(media_id, gone.tombstone), status_code=404)
        body = found.to_dict()
        if signed is not None:
            body["url"], body["url_expires_at"] = signed[0], signed[1].isoformat()
        body["variants"] = [variant.to_dict() for variant in variants]
        return body

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
    return _with_middleware(app, registry)


def _with_middleware(app: FastAPI, registry: CollectorRegistry) -> FastAPI:
    app.add_middleware(_Instrumented, registry=registry)
    return app


def database_ping(db) -> Callable[[], None]:
    def ping() -> None:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return ping
