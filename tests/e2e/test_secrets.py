"""No secret in any output: commands run with secret-bearing URLs, stdout, stderr and every log line
(JSON, at DEBUG, so libraries say all they would) searched for the secret."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import PG_URL

SECRET = "Sup3rS3cretPassw0rd"
TOKEN = "TokenInThePath0123456789"
QUERY_SECRET = "QueryS3cretValue"

LOUD = {"MEDIA_RETENTION_LOG_FORMAT": "json", "MEDIA_RETENTION_LOG_LEVEL": "DEBUG"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_hidden(result, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout, f"{secret!r} on stdout: {result.stdout}"
        assert secret not in result.stderr, f"{secret!r} on stderr: {result.stderr}"


def test_sweep_enqueue_to_an_unreachable_broker_names_it_without_its_password(shell):
    """The broker error says which broker, with the password masked."""
    result = shell("sweep", "--enqueue", env={**LOUD, "MEDIA_RETENTION_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0"})
    assert result.code == 1 and "redis://:***@127.0.0.1" in result.stderr
    assert_hidden(result, SECRET)


def test_an_unreachable_database_with_a_password_and_query_secrets_shows_neither(shell):
    """`status` against a database that refuses connections: one sentence, no password, no sslpassword."""
    url = f"postgresql+psycopg://media:{SECRET}@127.0.0.1:{closed_port()}/media?sslpassword={QUERY_SECRET}"
    result = shell("status", "--json", env={**LOUD, "MEDIA_RETENTION_DATABASE_URL": url})
    assert result.code == 1 and "database error" in result.stderr
    assert_hidden(result, SECRET, QUERY_SECRET)


def test_db_upgrade_status_and_verify_print_the_database_without_its_password(shell, pg_database):
    """Against a real PostgreSQL (trust auth ignores the password): the database line shows ***."""
    url = pg_database.url.replace("postgres@", f"postgres:{SECRET}@", 1)
    assert SECRET in url and url.startswith(PG_URL.split("@")[0])
    env = {**LOUD, "MEDIA_RETENTION_DATABASE_URL": url}
    upgraded = shell("db", "upgrade", "--json", env=env)
    assert upgraded.code == 0, upgraded.stderr
    assert upgraded.json["database"].startswith("postgresql+psycopg://postgres:***@127.0.0.1")
    for command in (("status",), ("status", "--json"), ("verify", "--json"), ("org", "set", "acme", "--json")):
        result = shell(*command, env=env)
        assert result.code == 0, result.stderr
        assert_hidden(result, SECRET)
    assert_hidden(upgraded, SECRET)


def test_an_s3_storage_url_with_credentials_is_refused_without_echoing_them(shell):
    """user:password in an s3:// URL: exit 2, the URL shown as s3://***@bucket/media."""
    result = shell("status", env={**LOUD, "MEDIA_RETENTION_STORAGE_URL": f"s3://AKIAEXAMPLEKEYID:{SECRET}@bucket/media"})
    assert result.code == 2 and "s3://***@bucket/media" in result.stderr
    assert_hidden(result, SECRET, "AKIAEXAMPLEKEYID")


def test_a_failing_webhook_logs_neither_its_path_token_nor_its_query(capsys, tmp_path):
    """requests names the host and the path separately in its errors; the log guard masks the pieces."""
    from config.logging import configure_logging
    from config.settings import load_settings
    from worker.engine import volume_notifiers
    from worker.volume.notifiers import WebhookNotifier
    from config.redact import redact_text, remember_settings

    settings = load_settings(data_dir=tmp_path, alert_webhook_url=f"http://127.0.0.1:{closed_port()}/hooks/{TOKEN}?token={QUERY_SECRET}",
                             alert_webhook_attempts=1, alert_webhook_timeout="1s")
    remember_settings(settings)
    configure_logging("json", "DEBUG", redact=redact_text)
    capsys.readouterr()
    [webhook] = [n for n in volume_notifiers(settings) if isinstance(n, WebhookNotifier)]
    assert webhook.http.send({"status": "firing"}, alert_status="firing") is False
    logged = capsys.readouterr().err
    assert "volume.webhook_failed" in logged and "127.0.0.1" in logged
    assert TOKEN not in logged and QUERY_SECRET not in logged


@pytest.mark.parametrize("variable", ["MEDIA_RETENTION_DATABASE_URL", "MEDIA_RETENTION_BROKER_URL"])
def test_an_unparsable_url_setting_is_one_sentence_without_the_url(shell, variable):
    """A URL no parser accepts is refused (exit 2) without repeating what may be a password."""
    result = shell("status", env={variable: f"postgresql://media:{SECRET}@db:notaport/x" if "DATABASE" in variable
                                  else f"redis://:{SECRET}@[::1/0"})
    assert result.code == 2 and variable in result.stderr and result.stderr.count("\n") == 1
    assert_hidden(result, SECRET)
