"""Mistakes an operator makes at 3 a.m., typed through the installed command: each gets one sentence on stderr
and exit 2 (bad input or usage), never a traceback, an "unexpected error", or a claim that did not come true."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ON_CI

pytestmark = pytest.mark.slow

PASSWORD = "Sup3r-secret-pw"


def assert_one_sentence(result, *words: str) -> None:
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("media-retention: "), result.stderr
    assert "unexpected error" not in lines[0] and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_serve_on_a_busy_port_says_so_in_one_sentence_and_exits_2_without_claiming_to_serve(shell):
    """A port another process listens on: exit 2 naming the port, and no "serving" line."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = shell("serve", "--port", str(port), timeout=30)
    assert_one_sentence(result, str(port), "already in use")
    assert "serving" not in result.stdout + result.stderr


@pytest.mark.parametrize("url", [f"mysql://app:{PASSWORD}@db.internal/media",
                                 f"postgresql+pg8000://app:{PASSWORD}@db.internal/media",
                                 f"oracle+cx_oracle://app:{PASSWORD}@db.internal/media",
                                 f"nosuchdb://app:{PASSWORD}@db.internal/media"])
def test_a_database_url_whose_driver_is_unsupported_or_not_installed_is_bad_input_naming_the_variable(shell, url):
    """The sentence names MEDIA_RETENTION_DATABASE_URL and never repeats the URL's password."""
    result = shell("status", env={"MEDIA_RETENTION_DATABASE_URL": url})
    assert_one_sentence(result, "MEDIA_RETENTION_DATABASE_URL")
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("args", [["audit", "--before", "99999999999999999999"],
                                  ["sweep", "--limit", "99999999999999999999"],
                                  ["sweep", "--dry-run", "--limit", "9223372036854775808"]])
def test_a_number_past_what_the_database_can_hold_is_bad_input(shell, args):
    """An id or a limit beyond a 64-bit integer is refused by its option, not by an overflow inside."""
    assert_one_sentence(shell(*args), args[-2])


@pytest.fixture
def read_only_volume():
    """A tmpfs the test can remount read-only: (its path, a function that remounts it read-only)."""
    where = Path(tempfile.mkdtemp(prefix="mr-rofs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=False,
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        where.rmdir()
        reason = f"a tmpfs cannot be mounted here ({mounted.stderr.strip()}), so EROFS cannot be produced"
        if ON_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(f"SKIPPED LOUDLY: {reason}")
    yield where, lambda: subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    subprocess.run(["umount", "-l", str(where)], check=False)
    where.rmdir()


def test_an_error_on_the_media_volume_names_the_real_path_not_a_directory_descriptor(shell, read_only_volume, tmp_path):
    """register --file onto a volume remounted read-only: the sentence names the directory under the media root."""
    media, make_read_only = read_only_volume
    env = {"MEDIA_RETENTION_STORAGE_URL": media.as_uri()}
    for args in (("db", "upgrade"), ("org", "set", "acme", "--retention", "30d")):
        assert shell(*args, env=env).code == 0
    make_read_only()
    upload = tmp_path / "voice.ogg"
    upload.write_bytes(b"voice")
    result = shell("register", "--org", "acme", "--file", str(upload), "--id", "voice-1", env=env)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0], result.stderr
    assert f"({media}/" in lines[0], lines[0]
