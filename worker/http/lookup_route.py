"""`GET /v1/media/{id}`, the lookup service's hot path: answered by `answer_lookup`, one function for both ways
a request reaches it.

Every lookup request is answered by `LookupRoute`, a plain ASGI middleware in front of FastAPI's routing:
per request, FastAPI's router, dependency injection (the bearer scheme, the path parameter) and exception
middleware cost about 100 µs of CPU, as much as the database's part of the lookup, and a serve process is
bound by its one core. FastAPI keeps the route itself (`create_app`): it describes it in /openapi.json from
the models in worker/http/app.py, answers its other methods (405) and serves it when the app is mounted
without this middleware; its endpoint calls the same `answer_lookup`, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from config.errors import Gone
from worker.catalog.results import Item, Variant
from worker.db_async import DatabaseUnavailable
from worker.responses import not_found_body

log = structlog.get_logger("worker.http")

LOOKUP_PATH = "/v1/media/{media_id}"
# What Starlette's router matches `{media_id}` with (any characters but '/', on the decoded path): a path it
# would not route here is not taken here either.
_LOOKUP_PATH = re.compile(r"/v1/media/([^/]+)")
# What a 503 asks callers to wait before retrying: a database failover or restart takes seconds.
RETRY_AFTER_SECONDS = 5
UNAUTHORIZED_MESSAGE = "a valid API key is required: Authorization: Bearer <key>."
UNAVAILABLE_MESSAGE = "the catalog database cannot be reached; retry later."


def json_bytes(body: dict) -> bytes:
    """A body as Starlette's JSONResponse renders it: compact, UTF-8, no NaN."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def error_body(status: int, error: str, message: str) -> dict:
    return {"status": status, "error": error, "message": message}


@dataclass(frozen=True)
class Answered:
    """A lookup's HTTP answer: status, JSON body, extra headers, and the org of the key (for the access log)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    org: str | None = field(default=None, compare=False)


async def answer_lookup(lookups, authorization: str | None, media_id: str) -> Answered:
    """The answer to `GET /v1/media/{media_id}` with this Authorization header value: 200 and the item, 404
    gone or not found, 400 for a malformed ID (with a valid key), 401 without one, 503 while the database
    cannot be reached. Never raises for any of these; anything else propagates (a 500)."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    token = credentials if authorization and scheme.lower() == "bearer" and credentials else None
    try:
        answer = await lookups.answer(token, media_id)
    except DatabaseUnavailable as exc:
        return database_unavailable(exc)
    if answer.org is None:
        return Answered(401, json_bytes(error_body(401, "unauthorized", UNAUTHORIZED_MESSAGE)),
                        (("www-authenticate", "Bearer"),))
    if answer.malformed is not None:
        return Answered(400, json_bytes(error_body(400, "bad_request", str(answer.malformed))), org=answer.org)
    found = answer.found
    if not isinstance(found, Item):
        return Answered(404, json_bytes(not_found_body(media_id, found)), org=answer.org)
    signed, variants = None, found.variants or ()
    if lookups.can_presign:
        # Signing is CPU work, but a store's credentials may be refreshed over the network on the way: off the
        # event loop. (A filesystem store signs nothing and skips the hand-off.)
        try:
            signed, variants = await run_in_threadpool(_signed, lookups, found)
        except Gone as gone:
            return Answered(404, json_bytes(not_found_body(media_id, gone.tombstone)), org=answer.org)
    return Answered(200, render_item(found, signed, variants), org=answer.org)


def database_unavailable(exc: Exception) -> Answered:
    """503 with Retry-After: the caller should retry; not an internal error of ours. Logs the error's type only
    (a driver's message can quote a connection URL)."""
    log.warning("http.database_unavailable", error_type=type(exc).__name__)
    return Answered(503, json_bytes(error_body(503, "unavailable", UNAVAILABLE_MESSAGE)),
                    (("retry-after", str(RETRY_AFTER_SECONDS)),))


def _signed(lookups, item: Item) -> tuple[tuple[str, datetime] | None, tuple[Variant, ...]]:
    """The item's presigned URL and its variants with theirs; raises Gone when less than a second is left."""
    return lookups.sign(item), lookups.sign_variants(item)


def _timestamp(value: datetime) -> str:
    """A UTC time as the 200 body has always carried it (pydantic's rendering): ISO 8601 ending in Z."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def render_item(item: Item, signed: tuple[str, datetime] | None, variants: tuple[Variant, ...]) -> bytes:
    """The 200 body, `MediaItemBody` field for field and in its order, as bytes. Rendered by hand: validating a
    dict we built ourselves through the pydantic model cost more than rendering it (tests hold the two equal)."""
    return json_bytes({
        "id": item.id,
        "org": item.org,
        "key": item.key,
        "size": item.size,
        "mime": item.mime,
        "sha256": item.sha256,
        "created_at": _timestamp(item.created_at),
        "ttl_seconds": item.ttl_seconds,
        "expires_at": _timestamp(item.expires_at),
        "state": item.state,
        "held": bool(item.held),
        "url": signed[0] if signed else None,
        "url_expires_at": _timestamp(signed[1]) if signed else None,
        "variants": [{"key": variant.key, "size": variant.size, "mime": variant.mime, "url": variant.url}
                     for variant in variants],
    })


async def send_answer(send, answered: Answered) -> None:
    headers = [(b"content-length", str(len(answered.body)).encode()), (b"content-type", b"application/json")]
    headers += [(name.encode(), value.encode()) for name, value in answered.headers]
    await send({"type": "http.response.start", "status": answered.status, "headers": headers})
    await send({"type": "http.response.body", "body": answered.body})


class LookupRoute:
    """ASGI middleware: answers `GET /v1/media/{id}` itself and hands every other request to `app`. It records
    the route and the key's org in the scope, as FastAPI's routing would, for the access log and the metrics."""

    def __init__(self, app, *, lookups, route):
        self.app = app
        self.lookups = lookups
        self.route = route  # FastAPI's route object for the same path (its `.path` labels the metrics)

    async def __call__(self, scope, receive, send):
        match = _LOOKUP_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            answered = await answer_lookup(self.lookups, authorization, match.group(1))
        except Exception as exc:  # noqa: BLE001 - any other failure is a 500 with a JSON body, as FastAPI's handler gives
            log.error("http.server_error", error_type=type(exc).__name__)
            answered = Answered(500, json_bytes(error_body(500, "internal_error", "the lookup failed; see the service log.")))
        if answered.org is not None:
            scope.setdefault("state", {})["org"] = answered.org
        await send_answer(send, answered)
