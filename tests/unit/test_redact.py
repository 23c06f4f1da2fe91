"""URL redaction: what is hidden, what stays readable."""

import pytest

from config import redact
from config.redact import redact_text, redact_url, secrets_of


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://media:hunter2@db:5432/media?sslpassword=k3y", "postgresql+psycopg://media:***@db:5432/media?sslpassword=***"),
    ("postgresql://postgres@127.0.0.1/test", "postgresql://postgres@127.0.0.1/test"),
    ("sqlite:////var/lib/media/catalog.sqlite3", "sqlite:////var/lib/media/catalog.sqlite3"),
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://default:hunter2@cache:6380/1?ssl_cert_reqs=required", "rediss://default:***@cache:6380/1?ssl_cert_reqs=***"),
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/media", "s3://***@bucket/media"),
    ("s3://bucket/media", "s3://bucket/media"),
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "https://hooks.slack.com/services/T00000000/B00000000/***"),
    ("https://alerts.example/hook?token=abc&team=ops", "https://alerts.example/hook?token=***&team=***"),
    ("http://user:pw@[::1]:9093/api/v2/alerts", "http://user:***@[::1]:9093/api/v2/alerts"),
    ("file:///srv/media", "file:///srv/media"),
    ("postgresql://u:p@h:notaport/db", "postgresql://***"),
    ("http://h:99999999/x", "http://***"),
])
def test_a_url_is_printed_without_its_secrets(url, shown):
    """Passwords, query values, token path segments and S3 keys become ***; the rest stays readable."""
    assert redact_url(url) == shown


def test_urls_inside_text_are_redacted_and_remembered_secrets_are_masked_in_pieces(monkeypatch):
    """A library error that quotes the host and the path separately still loses the token."""
    monkeypatch.setattr(redact, "_known", set())
    monkeypatch.setattr(redact, "_ordered", ())
    redact.remember(["https://hooks.example/services/T0/B0/SeCrEtToKeN0123456789?sig=S1GNATURE"])
    message = ("HTTPSConnectionPool(host='hooks.example', port=443): Max retries exceeded with url: "
               "/services/T0/B0/SeCrEtToKeN0123456789?sig=S1GNATURE (Caused by ...); see also redis://:pw123456@x/0")
    cleaned = redact_text(message)
    assert "SeCrEtToKeN0123456789" not in cleaned and "S1GNATURE" not in cleaned and "pw123456" not in cleaned
    assert "hooks.example" in cleaned and "Max retries exceeded" in cleaned


def test_secrets_of_names_password_query_values_and_path_tokens():
    """What `remember` will search for, raw and percent-decoded."""
    assert set(secrets_of("https://u:p%40ssw0rd@h/a/LongTokenLongToken1?k=v%2Bvalue")) >= {"p%40ssw0rd", "p@ssw0rd", "LongTokenLongToken1", "v+value"}


def test_text_kept_on_purpose_is_printed_whole_while_everything_around_it_is_still_redacted():
    """A presigned URL the user asked for keeps its signature; a password URL in the same line is still masked."""
    presigned = "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abcdef0123456789"
    line = f"url: {presigned} via postgresql://app:hunter22@db/x and {presigned}"
    shown = redact_text(line, keep=(presigned,))
    assert shown == f"url: {presigned} via postgresql://app:***@db/x and {presigned}"
    assert "X-Amz-Signature=***" in redact_text(line)


def test_a_bearer_token_we_sent_is_masked_in_every_encoding_a_receiver_may_echo_it_in():
    """The token of an Authorization: Bearer header, echoed raw, percent-encoded, JSON-escaped or in base64."""
    from base64 import b64encode
    from urllib.parse import quote

    from config.redact import credential_secrets, mask_secrets

    token = "tok/en+With=Odd_chars-42"
    secrets = credential_secrets("https://hooks.example/alerts", f"Bearer {token}")
    echoed = [f"Authorization: Bearer {token}", quote(token, safe=""), token.replace("/", "\\/"),
              b64encode(token.encode()).decode(), f"auth={quote(token, safe='').lower()}"]
    for text in echoed:
        masked = mask_secrets(f"refused: {text} (see docs)", secrets)
        assert "***" in masked and masked.startswith("refused: ") and masked.endswith(" (see docs)"), masked
        assert "With=Odd" not in masked and "With%3DOdd" not in masked.replace("%3d", "%3D"), masked
