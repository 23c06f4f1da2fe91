"""Presigned URLs as a real object store checks them: s3rver (npm, tests/s3rver/) verifies every SigV4
signature, where moto accepts any. A URL the CLI or the HTTP service prints must fetch the exact bytes there,
and a tampered one must be refused, proving the server checks."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import boto3
import pytest
import requests
from botocore.config import Config

from tests.conftest import ON_CI, Result, free_port
from tests.e2e.conftest import SCRIPT

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

S3RVER_DIR = Path(__file__).resolve().parents[1] / "s3rver"
# s3rver's one built-in account: it signs and checks with this key pair.
ACCESS_KEY = SECRET_KEY = "S3RVER"
BUCKET = "media-bucket"
BLOB = b"\x00\xffvoice note \xe2\x9c\x93" * 100


def _missing(reason: str) -> None:
    if ON_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


@pytest.fixture(scope="module")
def s3rver(tmp_path_factory) -> Iterator[str]:
    """A signature-checking S3 server (tests/s3rver/serve.js) on a free loopback port with one bucket; its URL."""
    if shutil.which("node") is None:
        _missing("node is not installed (the s3rver tests need Node.js)")
    if not (S3RVER_DIR / "node_modules" / "@20minutes" / "s3rver").is_dir():
        _missing(f"s3rver is not installed; run `npm ci` in {S3RVER_DIR}")
    server = subprocess.Popen(["node", str(S3RVER_DIR / "serve.js"), str(tmp_path_factory.mktemp("s3rver")), BUCKET],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()  # printed once it listens
        if not port.isdigit():
            pytest.fail(f"s3rver did not start: {server.stderr.read()}", pytrace=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.communicate(timeout=10)


@pytest.fixture
def shell_on_s3rver(data_dir, s3rver, pg_database) -> Iterator:
    """Run the installed `media-retention` in a subprocess on a PostgreSQL catalog and a new prefix of the s3rver
    bucket (each store is bound to one catalog)."""
    env = {**os.environ, "MEDIA_RETENTION_DATA_DIR": str(data_dir), "MEDIA_RETENTION_DATABASE_URL": pg_database.url,
           "MEDIA_RETENTION_STORAGE_URL": f"s3://{BUCKET}/{secrets.token_hex(4)}", "MEDIA_RETENTION_S3_ENDPOINT_URL": s3rver,
           "MEDIA_RETENTION_PRESIGN_TTL": "15m", "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)

    def run(*args: str) -> Result:
        done = subprocess.run([str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60, env=env,
                              stdin=subprocess.DEVNULL)
        return Result(done.returncode, done.stdout, done.stderr)

    run.env = env
    return run


def _tampered(url: str) -> str:
    """The same URL with its signature's last character changed."""
    parts = urlsplit(url)
    query = [(name, value[:-1] + ("0" if value[-1] != "0" else "1") if name == "X-Amz-Signature" else value)
             for name, value in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_s3rver_refuses_a_presigned_url_whose_signature_was_changed(s3rver):
    """The server the tests rely on checks signatures: a good presigned URL fetches, a tampered one gets 403."""
    client = boto3.session.Session().client("s3", endpoint_url=s3rver, region_name="us-east-1",
                                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                            config=Config(signature_version="s3v4"))
    client.put_object(Bucket=BUCKET, Key="probe", Body=b"probe")
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "probe"}, ExpiresIn=60)
    assert requests.get(url, timeout=10).content == b"probe"
    assert requests.get(_tampered(url), timeout=10).status_code == 403


def _registered(shell, tmp_path: Path) -> None:
    upload = tmp_path / "voice.ogg"
    upload.write_bytes(BLOB)
    for args in (("db", "upgrade"), ("org", "set", "acme", "--retention", "30d"),
                 ("register", "--org", "acme", "--file", str(upload), "--id", "voice-1")):
        result = shell(*args)
        assert result.code == 0, result.stderr


def test_lookup_url_prints_a_presigned_url_that_a_signature_checking_store_serves(shell_on_s3rver, tmp_path):
    """`lookup ID --url` (text and --json) prints the URL whole: GET returns the exact bytes, a tampered URL 403."""
    _registered(shell_on_s3rver, tmp_path)
    as_json = shell_on_s3rver("lookup", "voice-1", "--url", "--json")
    as_text = shell_on_s3rver("lookup", "voice-1", "--url")
    assert (as_json.code, as_text.code) == (0, 0), as_json.stderr + as_text.stderr
    text_url = next(line.removeprefix("url: ") for line in as_text.stdout.splitlines() if line.startswith("url: "))
    for url in (json.loads(as_json.stdout)["url"], text_url):
        assert "***" not in url
        fetched = requests.get(url, timeout=10)
        assert (fetched.status_code, fetched.content) == (200, BLOB)
        assert requests.get(_tampered(url), timeout=10).status_code == 403
    # The secret key signs the URL; it is never in it, nor anywhere else in what was printed.
    assert SECRET_KEY + "/" not in as_json.stdout + as_text.stdout + as_json.stderr + as_text.stderr


def test_the_http_service_answers_a_presigned_url_a_signature_checking_store_serves(shell_on_s3rver, tmp_path):
    """`serve`'s GET /v1/media/{id} carries a presigned URL that fetches the exact bytes from s3rver."""
    _registered(shell_on_s3rver, tmp_path)
    created = shell_on_s3rver("apikey", "create", "--org", "acme", "--json")
    assert created.code == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    port = free_port()
    server = subprocess.Popen([str(SCRIPT), "serve", "--port", str(port)], env=shell_on_s3rver.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/v1/media/voice-1",
                                      headers={"Authorization": f"Bearer {token}"}, timeout=5)
                break
            except requests.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
                time.sleep(0.2)
        assert answer.status_code == 200, answer.text
        fetched = requests.get(answer.json()["url"], timeout=10)
        assert (fetched.status_code, fetched.content) == (200, BLOB)
    finally:
        server.terminate()
        server.communicate(timeout=10)
