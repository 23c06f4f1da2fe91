"""A receiver (or a proxy in front of it) that echoes the request in its error answer must not put the
credentials we sent into our log: the first characters of a refusing answer are logged, so every form of
every credential is masked first."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, urlencode

import pytest
from structlog.testing import capture_logs

from tests.volume_support import real_ratio, thresholds_below, volume_settings
from worker.engine import build
from worker.store.fs import FilesystemStore

pytestmark = pytest.mark.postgres

USER, PASSWORD = "alice", "p@ss/w+rd=Sx9Q"
PATH_TOKEN, QUERY_TOKEN = "T0KENinThePath0123456789", "qT0ken-9876"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
# Every way the secrets may come back: raw, percent-encoded, JSON-escaped, and the base64 of Basic auth.
FORMS = [PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD, safe="").lower(), PASSWORD.replace("/", "\\/"),
         BASIC, BASIC.rstrip("="), PATH_TOKEN, QUERY_TOKEN]


def _decoded(headers: dict) -> str:
    """A proxy that logs the Basic credentials it decoded."""
    user, _, password = base64.b64decode(headers["Authorization"].split()[1]).decode().partition(":")
    return f"denied user={user} password={password}"


def _credentials_first(headers: dict) -> dict:
    """The request line and Authorization first: what is logged is the start of the answer."""
    return {"Request": headers["Request"], "Authorization": headers["Authorization"], **headers}


ECHOES = {
    "header lines": lambda headers: "".join(f"{name}: {value}\n" for name, value in _credentials_first(headers).items()),
    "json": lambda headers: json.dumps(_credentials_first(headers)).replace("/", "\\/"),
    "form-encoded": lambda headers: urlencode(_credentials_first(headers)),
    "decoded basic auth": _decoded,
}


@pytest.mark.parametrize("echo", ECHOES)
@pytest.mark.parametrize("sink", ["alert_webhook_url", "alertmanager_url"])
def test_an_echoing_receiver_gets_no_credential_of_ours_into_the_log(tmp_path, pg_database, receiver, sink, echo):
    """The URL's user and password (sent as Basic auth), its path and query tokens: none in any log event,
    in any encoding, while the refusal itself is still logged."""
    receiver.behaviour, receiver.echo = "echo", ECHOES[echo]
    port = receiver.base.rsplit(":", 1)[1]
    path = "/api/v2/alerts" if sink == "alertmanager_url" else f"/hooks/{PATH_TOKEN}"
    url = f"http://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}{path}?token={QUERY_TOKEN}"
    (tmp_path / "media").mkdir()
    store = FilesystemStore(tmp_path / "media", delete_threads=1)
    settings = volume_settings(tmp_path, pg_database, alert_webhook_attempts=1, **{sink: url},
                               **thresholds_below(real_ratio(store.root)))
    with capture_logs() as events:
        build(settings, database=pg_database, store=store).volume_monitor(enqueue_sweep=lambda: None).check()
    assert receiver.posts, "the alert was never posted"
    assert receiver.posts[0]["path"].startswith(path)
    failures = [event for event in events if event["event"].endswith("_attempt_failed")]
    assert failures and all(event["error"].startswith("HTTP 500: ") for event in failures), events
    assert "***" in failures[0]["error"]  # the echo was logged, masked
    logged = "\n".join(repr(event) for event in events)
    leaked = [form for form in FORMS if form.lower() in logged.lower()]
    assert not leaked, logged
