"""`media-retention serve` as an integrating service meets it: a real server process on a free port,
spoken to over HTTP with `requests`, on SQLite and PostgreSQL (and an object store for presigned URLs)."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import pytest
import requests
from openapi_spec_validator import validate as validate_openapi

from tests.factories import db_time, wait_past
from tests.fleet import wait_until
from tests.s3 import PREFIX
from tests.serve_support import Server, start_server, stop_server
from worker.catalog import Catalog
from worker.catalog.apikeys import ApiKeys
from worker.db import Database
from worker.models import ApiKey

pytestmark = pytest.mark.slow
SCRIPT = Path(sys.executable).with_name("media-retention")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")



@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start `media-retention serve` processes with the given settings; all are stopped afterwards."""
    servers: list[Server] = []

    def start(**env: str) -> Server:
        server = start_server(env, tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop_server(server)


@pytest.fixture
def server(serve, database: Database, media_root: Path) -> Server:
    """A server on this test's catalog (SQLite or PostgreSQL) and filesystem store."""
    return serve(MEDIA_RETENTION_DATABASE_URL=database.url, MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())


@pytest.fixture
def orgs(catalog: Catalog) -> dict[str, str]:
    """Two orgs, acme and globex, and an API key of each: {org: token}."""
    keys = ApiKeys(catalog.db)
    tokens = {}
    for org in ("acme", "globex"):
        catalog.set_org(org, "30d")
        tokens[org] = keys.create(org, name=f"{org} app", actor="test").token
    return tokens


def register(catalog: Catalog, tmp_path: Path, org: str, media_id: str, **options):
    source = tmp_path / f"{media_id}.bin"
    source.write_bytes(media_id.encode() * 10)
    return catalog.register(org=org, file=source, media_id=media_id, **options)


def test_an_active_item_answers_200_then_404_gone_with_reason_once_expired_and_swept(server, catalog, orgs, tmp_path):
    """A lookup returns the item while active and `gone` with reason and deletion time after the sweep."""
    two_hours_ago = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    register(catalog, tmp_path, "acme", "photo-1")
    register(catalog, tmp_path, "acme", "voice-1", ttl="1h", created_at=two_hours_ago)

    active = server.get("/v1/media/photo-1", orgs["acme"])
    assert active.status_code == 200
    body = active.json()
    assert (body["id"], body["org"], body["state"], body["size"]) == ("photo-1", "acme", "active", 70)
    assert body["url"] is None  # a filesystem store hands out no URLs

    catalog.sweeper.sweep()
    gone = server.get("/v1/media/voice-1", orgs["acme"])
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/json"
    assert gone.json()["error"] == "gone" and gone.json()["reason"] == "ttl"
    assert datetime.fromisoformat(gone.json()["deleted_at"]) <= datetime.now(timezone.utc)

    catalog.purge(ids=["photo-1"], actor="test")
    purged = server.get("/v1/media/photo-1", orgs["acme"]).json()
    assert (purged["status"], purged["error"], purged["reason"]) == (404, "gone", "purge")


def test_an_item_past_its_expiry_answers_404_gone_before_any_sweep_unless_it_is_held(server, catalog, orgs, tmp_path):
    """Unswept but expired by the database clock: 404 gone (ttl, then retention after `org set` shortens it),
    state `expired`, deleted_at its expiry; a like item held before its expiry answers 200 past it."""
    created = db_time(catalog) - timedelta(hours=2)
    voice = register(catalog, tmp_path, "acme", "voice-1", ttl="1h", created_at=created)
    photo = register(catalog, tmp_path, "acme", "photo-1", created_at=db_time(catalog) - timedelta(days=10))
    held_item = register(catalog, tmp_path, "acme", "held-1", ttl="1h",
                         created_at=db_time(catalog) - timedelta(hours=1) + timedelta(seconds=3))
    catalog.set_hold(held=True, reason="litigation", ids=["held-1"], actor="test")
    wait_past(catalog, held_item)

    gone = server.get("/v1/media/voice-1", orgs["acme"])
    assert gone.status_code == 404
    assert gone.json() == {"id": "voice-1", "status": 404, "error": "gone", "reason": "ttl",
                           "deleted_at": voice.expires_at.isoformat(), "state": "expired"}
    assert server.get("/v1/media/photo-1", orgs["acme"]).status_code == 200
    catalog.set_org("acme", "7d")
    retention = server.get("/v1/media/photo-1", orgs["acme"]).json()
    assert (retention["status"], retention["reason"], retention["state"]) == (404, "retention", "expired")
    assert datetime.fromisoformat(retention["deleted_at"]) == photo.created_at + timedelta(days=7)
    held = server.get("/v1/media/held-1", orgs["acme"])
    assert (held.status_code, held.json()["state"], held.json()["held"]) == (200, "active", True)
    assert server.get("/v1/media/voice-1", orgs["globex"]).json()["error"] == "not_found"


def test_an_item_that_expires_while_the_server_runs_answers_404_from_its_expiry_by_the_database_clock(
        server, catalog, orgs, tmp_path):
    """Looked up before and after its expiry on the same warm server (its connection and statement reused): 200,
    then 404 gone with state `expired`. Each lookup reads the database's clock in its own statement; a clock read
    once per connection or transaction would keep answering 200."""
    soon = register(catalog, tmp_path, "acme", "soon-1", ttl="1h",
                    created_at=db_time(catalog) - timedelta(hours=1) + timedelta(seconds=2))
    for _ in range(3):
        assert server.get("/v1/media/soon-1", orgs["acme"]).status_code == 200
    wait_until(lambda: db_time(catalog) > soon.expires_at, 10, "the item's expiry")
    gone = server.get("/v1/media/soon-1", orgs["acme"])
    assert gone.status_code == 404, gone.json()
    assert (gone.json()["state"], gone.json()["reason"]) == ("expired", "ttl")


def test_an_id_never_seen_answers_404_not_found_and_a_malformed_one_400(server, orgs):
    """Unknown IDs are `not_found`; an ID outside the alphabet is a bad request with one sentence."""
    unknown = server.get("/v1/media/never-registered", orgs["acme"])
    assert unknown.status_code == 404
    assert unknown.json() == {"id": "never-registered", "status": 404, "error": "not_found"}
    malformed = server.get("/v1/media/bad%20id!", orgs["acme"])
    assert malformed.status_code == 400
    assert malformed.json()["error"] == "bad_request" and "invalid media id" in malformed.json()["message"]
    too_long = server.get("/v1/media/" + "a" * 129, orgs["acme"])
    assert too_long.status_code == 400


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_huge_malformed_id_is_quoted_cut_short_in_the_400_body_and_the_access_log(server, orgs):
    """A 100 KB ID answers 400 with a body of a few hundred bytes naming its length, and logs one short line."""
    huge = "x" * 100_000 + "!"
    answer = server.get(f"/v1/media/{huge}", orgs["acme"])
    assert answer.status_code == 400
    assert len(answer.content) < 400
    assert "x" * 64 in answer.json()["message"] and "(100001 characters)" in answer.json()["message"]
    time.sleep(0.3)  # the log reader is a thread
    [line] = [line for line in server.log_lines if '"http.request"' in line and '"status": 400' in line]
    assert len(line) < 600 and "characters)" in line


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def read_response(connection: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body): the server may write them apart, and a body
    left unread would be taken for an answer to the next request."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_connections_that_never_finish_their_headers_are_closed_after_the_deadline_while_lookups_answer(
        server, catalog, orgs, tmp_path):
    """300 connections send half a request head, and one more a whole request then half a second: a lookup
    still answers 200 meanwhile, and every one of them is closed by the server within the deadline."""
    from worker.http.server import HEADER_TIMEOUT_S

    register(catalog, tmp_path, "acme", "photo-1")
    port = int(server.url.rsplit(":", 1)[1])
    started = time.monotonic()
    stalled = []
    for _ in range(300):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(b"GET /v1/media/photo-1 HTTP/1.1\r\nHost: lookup\r\nAuthorization: Bea")
        stalled.append(connection)
    kept_alive = socket.create_connection(("127.0.0.1", port))
    kept_alive.sendall(f"GET /v1/media/photo-1 HTTP/1.1\r\nHost: lookup\r\nAuthorization: Bearer {orgs['acme']}\r\n\r\n"
                       .encode())
    kept_alive.settimeout(5)
    assert read_response(kept_alive).startswith(b"HTTP/1.1 200 ")
    kept_alive.sendall(b"GET /v1/media/photo-1 HTTP/1.1\r\nHo")
    stalled.append(kept_alive)

    assert server.get("/v1/media/photo-1", orgs["acme"]).status_code == 200
    assert time.monotonic() - started < HEADER_TIMEOUT_S  # the lookup answered while all of them were held

    for connection in stalled:
        connection.settimeout(max(0.1, started + HEADER_TIMEOUT_S + 5 - time.monotonic()))
        try:
            assert connection.recv(65536) == b"", "the server answered a request whose head never ended"
        except ConnectionResetError:
            pass  # closed as well
        except TimeoutError:
            pytest.fail(f"a connection was still open {time.monotonic() - started:.1f} s after its first bytes")
        finally:
            connection.close()
    assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.5  # not closed early either


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_serve_lifts_a_low_open_file_limit_to_fit_its_connection_cap(serve, database, media_root):
    """Started with the common soft limit of 1,024 descriptors, the server raises it to its cap plus spares,
    so accept() does not fail before the cap answers 503."""
    import resource

    from worker.http.server import MAX_CONNECTIONS, SPARE_DESCRIPTORS

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + SPARE_DESCRIPTORS
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit here is {hard}, below the {wanted} the server asks for")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by the server process
    try:
        server = serve(MEDIA_RETENTION_DATABASE_URL=database.url, MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3] == str(wanted)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("with_key", [True, False], ids=["with an API key", "without a key"])
def test_schemathesis_finds_no_failure_of_its_default_checks_against_the_openapi_description(
        server, database, media_root, catalog, tmp_path, with_key):
    """`schemathesis run` against a real server's /openapi.json: every default check passes (schema-valid IDs
    are accepted, schema-invalid ones refused, every answer fits its declared schema), with a key and without."""
    catalog.set_org("acme", "30d")
    register(catalog, tmp_path, "acme", "photo-1")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MEDIA_RETENTION_")}
    environment.update(MEDIA_RETENTION_DATA_DIR=str(tmp_path / "data"), MEDIA_RETENTION_DATABASE_URL=database.url,
                       MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())
    headers = []
    if with_key:
        created = subprocess.run([str(SCRIPT), "apikey", "create", "--org", "acme", "--json"], env=environment,
                                 capture_output=True, text=True, timeout=60, check=True)
        headers = ["-H", f"Authorization: Bearer {json.loads(created.stdout)['token']}"]
    # Bounded examples keep the run to seconds; the phases (examples, coverage, fuzzing) each still run. Run in
    # tmp_path: schemathesis keeps a cache (.schemathesis/) in its working directory.
    result = subprocess.run([str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", *headers, "--max-examples", "200",
                             "--no-color"], check=False, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"(\d+) generated, \1 passed", result.stdout), result.stdout[-4000:]


def test_another_orgs_media_answers_exactly_like_media_never_seen(server, catalog, orgs, tmp_path):
    """A key of one org gets 404 not_found for another org's active and deleted media, never 403 or `gone`."""
    register(catalog, tmp_path, "globex", "secret-plan")
    register(catalog, tmp_path, "globex", "old-plan")
    catalog.purge(ids=["old-plan"], actor="test")
    for media_id in ("secret-plan", "old-plan"):
        answer = server.get(f"/v1/media/{media_id}", orgs["acme"])
        assert answer.status_code == 404
        assert answer.json() == {"id": media_id, "status": 404, "error": "not_found"}
    assert server.get("/v1/media/secret-plan", orgs["globex"]).status_code == 200


def test_requests_without_a_valid_key_get_401_and_a_revoked_key_stops_working_at_once(server, catalog, orgs, tmp_path):
    """No key, another scheme, a wrong secret, an unknown key id and a revoked key all answer 401."""
    register(catalog, tmp_path, "acme", "photo-1")
    token = orgs["acme"]
    prefix, key_id, secret = token.split("_", 2)
    wrong_secret = f"{prefix}_{key_id}_{'A' * len(secret)}"
    unknown_key = f"{prefix}_k{'0' * 16}_{secret}"
    for headers in ({}, {"Authorization": f"Basic {token}"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer {wrong_secret}"}, {"Authorization": f"Bearer {unknown_key}"},
                    {"Authorization": "Bearer not-a-key"}):
        answer = server.get("/v1/media/photo-1", **headers)
        assert answer.status_code == 401, headers
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"] == "unauthorized"

    assert server.get("/v1/media/photo-1", token).status_code == 200
    ApiKeys(catalog.db).revoke(key_id, actor="test")
    assert server.get("/v1/media/photo-1", token).status_code == 401


def test_health_readiness_and_metrics_answer_with_request_counts_and_latency(server, orgs):
    """/healthz and /readyz answer 200; /metrics counts lookups by route and status and times them."""
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json() == {"status": "ready"}
    for _ in range(3):
        server.get("/v1/media/nothing-here", orgs["acme"])
    server.get("/v1/media/nothing-here")
    metrics = server.get("/metrics").text
    assert 'media_retention_http_requests_total{method="GET",route="/v1/media/{media_id}",status="404"} 3.0' in metrics
    assert 'media_retention_http_requests_total{method="GET",route="/v1/media/{media_id}",status="401"} 1.0' in metrics
    assert 'media_retention_http_request_duration_seconds_count{method="GET",route="/v1/media/{media_id}"} 4.0' in metrics


def test_probes_and_scrapes_stay_out_of_the_info_log_while_lookups_are_logged(server, orgs):
    """At the default INFO level, /healthz, /readyz and /metrics (every few seconds from probes and
    Prometheus) write no `http.request` line; a lookup writes one, and the lookup service's catalog gauge
    says the database answers."""
    assert server.get("/healthz").status_code == 200
    assert server.get("/readyz").status_code == 200
    assert "media_retention_http_catalog_up 1.0" in server.get("/metrics").text
    server.get("/v1/media/nothing-here", orgs["acme"])

    def request_lines() -> list[dict]:
        events = [json.loads(line) for line in list(server.log_lines) if line.startswith("{")]
        return [event for event in events if event.get("event") == "http.request"]

    lines = wait_until(lambda: request_lines() or None, 10, "the lookup's http.request line")
    time.sleep(0.3)  # the log reader is a thread: let any probe line that would follow arrive
    assert [line["route"] for line in request_lines()] == ["/v1/media/{media_id}"]
    assert lines[0]["status"] == 404


def test_no_key_or_secret_reaches_the_server_log(server, catalog, orgs, tmp_path):
    """The access log names method, route, status and org, never the Authorization header or the token."""
    register(catalog, tmp_path, "acme", "photo-1")
    token = orgs["acme"]
    secret = token.split("_", 2)[2]
    server.get("/v1/media/photo-1", token)
    server.get("/v1/media/photo-1", token.replace(secret[:8], "AAAAAAAA"))
    server.get("/v1/media/photo-1?access_token=" + secret)
    time.sleep(0.3)  # the log reader is a thread
    assert '"event": "http.request"' in server.log and '"org": "acme"' in server.log
    assert secret not in server.log and secret[:16] not in server.log
    assert "Bearer" not in server.log


def test_the_openapi_description_is_valid_and_answers_match_its_schemas(server, catalog, orgs, tmp_path):
    """/openapi.json is a valid OpenAPI document; 200, 404 (gone: deleted or expired; not_found), 400 and 401
    bodies fit its schemas."""
    register(catalog, tmp_path, "acme", "photo-1")
    register(catalog, tmp_path, "acme", "photo-2")
    register(catalog, tmp_path, "acme", "voice-1", ttl="1h", created_at=db_time(catalog) - timedelta(hours=2))
    catalog.purge(ids=["photo-2"], actor="test")
    document = server.get("/openapi.json").json()
    validate_openapi(document)
    operation = document["paths"]["/v1/media/{media_id}"]["get"]
    assert {"bearerAuth", "HTTPBearer"} & {name for req in operation.get("security", []) for name in req}

    def schema_for(status: int) -> dict:
        schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
        return {**schema, "components": document["components"]}

    for path, token, status in [("/v1/media/photo-1", orgs["acme"], 200), ("/v1/media/photo-2", orgs["acme"], 404),
                                ("/v1/media/voice-1", orgs["acme"], 404), ("/v1/media/unknown", orgs["acme"], 404),
                                ("/v1/media/bad%20id", orgs["acme"], 400), ("/v1/media/photo-1", None, 401)]:
        answer = server.get(path, token)
        assert answer.status_code == status
        jsonschema.validate(answer.json(), schema_for(status),
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_an_object_store_item_comes_with_a_working_presigned_url_valid_at_most_an_hour(
        serve, database, s3_catalog, bucket, s3_endpoint, tmp_path):
    """On S3 the 200 body carries a fresh presigned URL that fetches the blob and expires within the hour."""
    catalog = s3_catalog
    catalog.set_org("acme", "30d")
    token = ApiKeys(database).create("acme", actor="test").token
    register(catalog, tmp_path, "acme", "photo-1")
    server = serve(MEDIA_RETENTION_DATABASE_URL=database.url, MEDIA_RETENTION_STORAGE_URL=f"s3://{bucket}/{PREFIX}",
                   MEDIA_RETENTION_S3_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    body = server.get("/v1/media/photo-1", token).json()
    assert requests.get(body["url"], timeout=10).content == b"photo-1" * 10
    lifetime = datetime.fromisoformat(body["url_expires_at"]) - datetime.now(timezone.utc)
    assert timedelta(minutes=55) < lifetime <= timedelta(hours=1)
    catalog.purge(ids=["photo-1"], actor="test")
    gone = server.get("/v1/media/photo-1", token)
    assert gone.status_code == 404 and "url" not in gone.json()


def test_an_object_store_url_never_outlives_its_item_and_an_item_about_to_expire_answers_gone(
        serve, database, s3_catalog, bucket, s3_endpoint, tmp_path):
    """On S3: ten minutes left, the URL and url_expires_at end at the expiry; an item held before its expiry and
    now past it gets a URL for the full hour; with half a second left the answer is 404 gone, no URL."""
    catalog = s3_catalog
    catalog.set_org("acme", "30d")
    token = ApiKeys(database).create("acme", actor="test").token
    server = serve(MEDIA_RETENTION_DATABASE_URL=database.url, MEDIA_RETENTION_STORAGE_URL=f"s3://{bucket}/{PREFIX}",
                   MEDIA_RETENTION_S3_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    soon = register(catalog, tmp_path, "acme", "soon-1", ttl="1h", created_at=db_time(catalog) - timedelta(minutes=50))
    body = server.get("/v1/media/soon-1", token).json()
    assert 590 < int(url_expires_param(body["url"])) <= 600
    assert soon.expires_at - timedelta(seconds=1) < datetime.fromisoformat(body["url_expires_at"]) <= soon.expires_at

    held_item = register(catalog, tmp_path, "acme", "held-1", ttl="1h",
                         created_at=db_time(catalog) - timedelta(hours=1) + timedelta(seconds=3))
    catalog.set_hold(held=True, reason="litigation", ids=["held-1"], actor="test")
    wait_past(catalog, held_item)
    held = server.get("/v1/media/held-1", token).json()
    assert url_expires_param(held["url"]) == "3600" and requests.get(held["url"], timeout=10).status_code == 200

    last = register(catalog, tmp_path, "acme", "last-1", ttl="1h",
                    created_at=db_time(catalog) - timedelta(hours=1, seconds=-0.5))
    gone = server.get("/v1/media/last-1", token)
    assert gone.status_code == 404 and "url" not in gone.json()
    assert gone.json() == {"id": "last-1", "status": 404, "error": "gone", "reason": "ttl",
                           "deleted_at": last.expires_at.isoformat(), "state": "expired"}


def url_expires_param(url: str) -> str:
    """The validity a presigned URL was signed with (SigV4's X-Amz-Expires, in seconds)."""
    [seconds] = parse_qs(urlparse(url).query)["X-Amz-Expires"]
    return seconds


def test_api_keys_are_stored_only_as_a_hash_of_their_secret(catalog):
    """The database row holds the SHA-256 of the secret, never the secret or the token."""
    import hashlib

    catalog.set_org("acme", "30d")
    created = ApiKeys(catalog.db).create("acme", actor="test")
    secret = created.token.split("_", 2)[2]
    with catalog.db.transaction() as session:
        row = session.get(ApiKey, created.key.id)
        values = [str(getattr(row, column.name)) for column in ApiKey.__table__.columns]
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in value for value in values)


class Relay:
    """A TCP relay to the database that the test can cut and restore: an outage without touching the server.
    With `round_trips`, it counts the round trips its clients start (see RoundTrips)."""

    def __init__(self, upstream: tuple[str, int], port: int = 0, round_trips: "RoundTrips | None" = None):
        self.upstream = upstream
        self.round_trips = round_trips
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.listener.fileno() == -1:
                client.close()
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            watch = self.round_trips.connection() if self.round_trips else None
            for source, target, seen in ((client, server, watch), (server, client, None)):
                threading.Thread(target=self._pump, args=(source, target, seen), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, seen: Callable[[bytes], None] | None = None) -> None:
        try:
            while data := source.recv(65536):
                if seen is not None:
                    seen(data)  # before forwarding: counted before the server can answer
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        # shutdown first: a bare close() does not wake the thread blocked in accept(), which keeps listening.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for connection in self.sockets:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()


class RoundTrips:
    """Round trips PostgreSQL clients start through a Relay, read from the frontend protocol: each simple Query
    ('Q') and each Sync ('S', which ends an extended-protocol exchange: Parse/Bind/Execute... then Sync) asks the
    server to answer. BEGIN and COMMIT, a pool's ping and a preparation each count as one. Needs a plaintext
    stream (sslmode=disable, gssencmode=disable)."""

    SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def connection(self) -> Callable[[bytes], None]:
        """A parser for one client connection's bytes."""
        pending = bytearray()
        started = False

        def feed(data: bytes) -> None:
            nonlocal started
            pending.extend(data)
            while True:
                if not started:  # untyped: the SSL/GSS requests, then the startup message
                    if len(pending) < 8:
                        return
                    length, code = struct.unpack("!ii", pending[:8])
                    if len(pending) < length:
                        return
                    del pending[:length]
                    started = code not in (self.SSL_REQUEST, self.GSSENC_REQUEST)
                    continue
                if len(pending) < 5:
                    return
                kind, (length,) = pending[:1], struct.unpack("!i", pending[1:5])
                if len(pending) < 1 + length:
                    return
                del pending[:1 + length]
                if kind in (b"Q", b"S"):
                    with self._lock:
                        self.count += 1

        return feed


def _through_relay(url: str, relay: Relay) -> str:
    """`url` (PostgreSQL) pointed at the relay, in plaintext so the relay can read it."""
    from sqlalchemy.engine import make_url

    return (make_url(url).set(host="127.0.0.1", port=relay.port)
            .update_query_dict({"sslmode": "disable", "gssencmode": "disable"}).render_as_string(hide_password=False))


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_every_lookup_costs_one_database_round_trip_whatever_it_answers(serve, database, catalog, orgs, tmp_path,
                                                                         media_root):
    """Counted on the wire between serve and PostgreSQL: a lookup answering 200, 404 gone (deleted; expired and
    not yet swept), 404 not_found, 404 for another org's media, 400 for a malformed ID, 401 for a wrong secret,
    an unknown key or a revoked key costs exactly one round trip (no BEGIN, COMMIT or ping around it), and a
    token that cannot be a key costs none."""
    from sqlalchemy.engine import make_url

    register(catalog, tmp_path, "acme", "photo-1")
    register(catalog, tmp_path, "acme", "photo-2")
    register(catalog, tmp_path, "acme", "voice-1", ttl="1h", created_at=db_time(catalog) - timedelta(hours=2))
    register(catalog, tmp_path, "globex", "theirs-1")
    catalog.purge(ids=["photo-2"], actor="test")
    keys = ApiKeys(catalog.db)
    revoked = keys.create("acme", actor="test")
    keys.revoke(revoked.key.id, actor="test")
    token = orgs["acme"]
    prefix, key_id, secret = token.split("_", 2)

    url = make_url(database.url)
    trips = RoundTrips()
    relay = Relay((url.host, url.port or 5432), round_trips=trips)
    try:
        server = serve(MEDIA_RETENTION_DATABASE_URL=_through_relay(database.url, relay),
                       MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())
        # The first lookup opens the lookup's connection and prepares its statement there (two round trips more).
        assert server.get("/v1/media/photo-1", token).status_code == 200

        def round_trips(path: str, token: str | None, status: int) -> int:
            before = trips.count
            assert server.get(path, token).status_code == status, path
            return trips.count - before

        assert round_trips("/v1/media/photo-1", token, 200) == 1
        assert round_trips("/v1/media/photo-2", token, 404) == 1
        assert round_trips("/v1/media/voice-1", token, 404) == 1
        assert round_trips("/v1/media/never-seen", token, 404) == 1
        assert round_trips("/v1/media/theirs-1", token, 404) == 1
        assert round_trips("/v1/media/bad%20id", token, 400) == 1
        assert round_trips("/v1/media/photo-1", f"{prefix}_{key_id}_{'A' * len(secret)}", 401) == 1
        assert round_trips("/v1/media/photo-1", f"{prefix}_k{'0' * 16}_{secret}", 401) == 1
        assert round_trips("/v1/media/photo-1", revoked.token, 401) == 1
        assert round_trips("/v1/media/photo-1", "not-a-key", 401) == 0
        assert round_trips("/v1/media/photo-1", None, 401) == 0
    finally:
        relay.cut()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_lookup_after_its_database_connection_was_cut_answers_at_once_on_a_new_connection(
        serve, database, catalog, orgs, tmp_path, media_root):
    """The database restarts between two lookups (the relay cut and restored: the pooled connection is dead): the
    next lookup answers 200, not 503, by running its statement once more on a new connection."""
    from sqlalchemy.engine import make_url

    register(catalog, tmp_path, "acme", "photo-1")
    url = make_url(database.url)
    relay = Relay((url.host, url.port or 5432))
    server = serve(MEDIA_RETENTION_DATABASE_URL=_through_relay(database.url, relay),
                   MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())
    assert server.get("/v1/media/photo-1", orgs["acme"]).status_code == 200
    relay.cut()
    relay = Relay((url.host, url.port or 5432), port=relay.port)
    try:
        assert server.get("/v1/media/photo-1", orgs["acme"]).status_code == 200
    finally:
        relay.cut()


def test_a_revoked_key_is_refused_by_every_replica_from_the_very_next_request(serve, database, catalog, orgs, tmp_path,
                                                                            media_root):
    """Two serve processes on one catalog, both having answered the key (connections open, statement prepared):
    once the key is revoked, the very next request with it is refused by each, while another key still works.
    Nothing about a key is kept between requests."""
    register(catalog, tmp_path, "acme", "photo-1")
    register(catalog, tmp_path, "globex", "photo-2")
    settings = {"MEDIA_RETENTION_DATABASE_URL": database.url, "MEDIA_RETENTION_STORAGE_URL": media_root.as_uri()}
    replicas = [serve(**settings), serve(**settings)]
    for replica in replicas:
        for _ in range(3):
            assert replica.get("/v1/media/photo-1", orgs["acme"]).status_code == 200
    ApiKeys(catalog.db).revoke(orgs["acme"].split("_", 2)[1], actor="test")
    for replica in replicas:
        answer = replica.get("/v1/media/photo-1", orgs["acme"])
        assert (answer.status_code, answer.json()["error"]) == (401, "unauthorized")
        assert replica.get("/v1/media/photo-2", orgs["globex"]).status_code == 200


def test_readyz_answers_503_while_the_database_is_unreachable_and_200_again_after(serve, pg_database, media_root):
    """Cut the connection to PostgreSQL: /readyz turns 503 (healthz stays 200), and recovers with the database."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_database.url)
    relay = Relay((url.host, url.port or 5432))
    server = serve(MEDIA_RETENTION_DATABASE_URL=url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False),
                   MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())
    assert server.get("/readyz").status_code == 200
    relay.cut()
    not_ready = server.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["error"] == "unavailable"
    assert server.get("/healthz").status_code == 200
    relay = Relay((url.host, url.port or 5432), port=relay.port)
    try:
        assert server.get("/readyz").status_code == 200
    finally:
        relay.cut()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_lookup_while_the_database_is_unreachable_answers_503_with_the_json_error_body(
        serve, database, catalog, orgs, media_root):
    """Cut the connection to PostgreSQL: a lookup answers 503 `unavailable` (JSON, Retry-After), never 500."""
    from sqlalchemy.engine import make_url

    url = make_url(database.url)
    token = orgs["acme"]
    relay = Relay((url.host, url.port or 5432))
    server = serve(MEDIA_RETENTION_DATABASE_URL=url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False),
                   MEDIA_RETENTION_STORAGE_URL=media_root.as_uri())
    assert server.get("/v1/media/nothing-1", token).status_code == 404
    relay.cut()
    answer = server.get("/v1/media/nothing-1", token)
    assert (answer.status_code, answer.headers["content-type"]) == (503, "application/json")
    assert answer.json() == {"status": 503, "error": "unavailable",
                             "message": "the catalog database cannot be reached; retry later."}
    assert int(answer.headers["Retry-After"]) > 0


def test_the_200_body_lists_the_variants_each_with_a_url_capped_like_the_items(
        serve, database, s3_catalog, bucket, s3_endpoint, objects):
    """On S3 each variant comes with key, size, MIME and its own presigned URL, valid exactly as long as the item's
    (ten minutes left: ten minutes), which fetches the variant's bytes; the body matches the OpenAPI schema."""
    catalog = s3_catalog
    catalog.set_org("acme", "30d")
    token = ApiKeys(database).create("acme", actor="test").token
    objects.put(bucket, [f"{PREFIX}/uploads/a.jpg"], b"item")
    objects.put(bucket, [f"{PREFIX}/thumbs/a.webp"], b"thumb")
    catalog.register(org="acme", key="uploads/a.jpg", media_id="a", ttl="1h",
                     created_at=db_time(catalog) - timedelta(minutes=50), variants=["thumbs/a.webp"])
    server = serve(MEDIA_RETENTION_DATABASE_URL=database.url, MEDIA_RETENTION_STORAGE_URL=f"s3://{bucket}/{PREFIX}",
                   MEDIA_RETENTION_S3_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    body = server.get("/v1/media/a", token).json()
    [variant] = body["variants"]
    assert {k: variant[k] for k in ("key", "size", "mime")} == {"key": "thumbs/a.webp", "size": 5, "mime": "image/webp"}
    assert url_expires_param(variant["url"]) == url_expires_param(body["url"])
    assert 590 < int(url_expires_param(variant["url"])) <= 600
    assert requests.get(variant["url"], timeout=10).content == b"thumb"
    document = server.get("/openapi.json").json()
    assert "variants" in document["components"]["schemas"]["MediaItemBody"]["properties"]
    jsonschema.validate(body, {"$ref": "#/components/schemas/MediaItemBody", "components": document["components"]})
