"""The lookup route's hand-written parts held to what FastAPI and pydantic would do: the 200 body to the OpenAPI
model's own rendering, and `LookupRoute` (ahead of FastAPI's routing) to FastAPI's route for the same path."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from config.errors import BadInput
from worker.catalog.keyed_lookup import REFUSED, KeyedAnswer
from worker.catalog.results import Item, Tombstone, Variant
from worker.db_async import DatabaseUnavailable
from worker.http.app import MediaItemBody, create_app
from worker.http.lookup_route import LookupRoute, render_item

CREATED = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=timezone.utc)
TOKEN = "mrk_k0123456789abcdef_" + "s" * 43


def item(**changes) -> Item:
    fields = dict(id="photo-1", org="acme", key="uploads/photo-1.jpg", size=70, mime="image/jpeg", sha256="ab" * 32,
                  created_at=CREATED, ttl_seconds=3600, expires_at=CREATED + timedelta(hours=1), state="active",
                  held=False, as_of=CREATED, variants=())
    fields.update(changes)
    return Item(**fields)


@pytest.mark.parametrize("found, signed, variants", [
    (item(), None, ()),
    (item(sha256=None, ttl_seconds=None, mime=None, held=True, created_at=CREATED.replace(microsecond=0)), None, ()),
    (item(id="caf\u00e9-1", key="uploads/caf\u00e9.jpg"), ("https://bucket.example/k?X-Amz-Expires=600", CREATED + timedelta(minutes=10)),
     (Variant("thumbs/a.webp", 5, "image/webp", "https://bucket.example/t?sig=1"), Variant("thumbs/b.webp", 6, "image/webp"))),
], ids=["plain", "nulls-held-whole-seconds", "signed-with-variants-non-ascii"])
def test_the_hand_rendered_200_body_is_byte_for_byte_what_pydantic_renders_from_the_openapi_model(found, signed, variants):
    """render_item equals MediaItemBody's own JSON for the same values (field order, null, Z-suffixed times)."""
    model = MediaItemBody(**{**found.to_dict(), "held": bool(found.held), "url": signed[0] if signed else None,
                             "url_expires_at": signed[1] if signed else None,
                             "variants": [{"key": v.key, "size": v.size, "mime": v.mime, "url": v.url} for v in variants]})
    assert render_item(found, signed, variants) == model.model_dump_json().encode()


class FakeLookups:
    """Answers by media ID: what a KeyedLookup would for a valid key; no key or a wrong one is refused."""

    can_presign = False

    def __init__(self):
        self.closed = False

    async def answer(self, token, media_id):
        if token != TOKEN:
            return REFUSED
        if media_id == "down":
            raise DatabaseUnavailable("the statement failed (OperationalError)")
        if media_id == "bad..id":
            return KeyedAnswer(org="acme", malformed=BadInput("invalid media id 'bad..id'."))
        if media_id == "gone-1":
            return KeyedAnswer(org="acme", found=Tombstone(id="gone-1", state="deleted", reason="ttl", deleted_at=CREATED))
        if media_id == "photo-1":
            return KeyedAnswer(org="acme", found=item(variants=(Variant("thumbs/a.webp", 5, "image/webp"),)))
        return KeyedAnswer(org="acme")

    async def close(self):
        self.closed = True


def call(app, path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> tuple[int, dict, bytes]:
    """One request through an ASGI app, in-process: (status, headers, body)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"lookup"), *headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return start["status"], {name.decode(): value.decode() for name, value in start["headers"]}, body


REQUESTS = [
    ("/v1/media/photo-1", [(b"authorization", f"Bearer {TOKEN}".encode())]),
    ("/v1/media/photo-1", [(b"authorization", f"bearer   {TOKEN}".encode())]),
    ("/v1/media/gone-1", [(b"authorization", f"Bearer {TOKEN}".encode())]),
    ("/v1/media/never-1", [(b"authorization", f"Bearer {TOKEN}".encode())]),
    ("/v1/media/bad..id", [(b"authorization", f"Bearer {TOKEN}".encode())]),
    ("/v1/media/down", [(b"authorization", f"Bearer {TOKEN}".encode())]),
    ("/v1/media/photo-1", []),
    ("/v1/media/photo-1", [(b"authorization", b"Bearer")]),
    ("/v1/media/photo-1", [(b"authorization", f"Basic {TOKEN}".encode())]),
    ("/v1/media/photo-1", [(b"authorization", b"Bearer mrk_wrong")]),
]


@pytest.mark.parametrize("path, headers", REQUESTS, ids=[f"{path} {headers[0][1][:12].decode() if headers else '-'}"
                                                           for path, headers in REQUESTS])
def test_the_lookup_route_ahead_of_fastapi_answers_exactly_as_fastapis_own_route(path, headers):
    """The same request through the app (LookupRoute answers it) and through the app without LookupRoute (FastAPI's
    route for the same path answers it): the same status, body and headers that matter."""
    fast = call(create_app(lookups=FakeLookups(), ping=lambda: None), path, headers)
    without = create_app(lookups=FakeLookups(), ping=lambda: None)
    without.user_middleware = [layer for layer in without.user_middleware if layer.cls is not LookupRoute]
    routed = call(without, path, headers)
    assert fast[0] == routed[0] and fast[2] == routed[2], (fast, routed)
    for name in ("content-type", "content-length", "www-authenticate", "retry-after"):
        assert fast[1].get(name) == routed[1].get(name), name
    assert json.loads(fast[2])  # a JSON body, whatever the status


def test_the_lookup_route_leaves_other_methods_and_paths_to_fastapi():
    """POST on the lookup path is FastAPI's 405, a path with a further segment FastAPI's 404: neither reaches the
    lookup (the fake would answer 401 without a key)."""
    lookups = FakeLookups()
    app = create_app(lookups=lookups, ping=lambda: None)
    assert call(app, "/v1/media/photo-1", [], method="POST")[0] == 405
    assert call(app, "/v1/media/photo-1/more", [])[0] == 404
    assert call(app, "/healthz", [])[0] == 200
