"""Arbitrary text in every argument and every setting (Hypothesis): the command line always answers
with an exit code of the contract, never a traceback; bad input is one line on stderr and changes
nothing in the catalog or the media tree."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import Settings, get_settings
from tests.e2e.support import snapshot

# What operators and scripts actually get wrong, mixed into the random text.
AWKWARD = [
    "", " ", "-", "--", "--json", "0", "-1", "1h", "30d", "99999999999999999999d", "P99999999999999D", "PT0S",
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "2026-02-30T00:00:00Z", "a" * 300, "img-1", "img-1\n", "acme",
    "acme\n", "../x", "/etc/passwd", "a//b", "image/jpeg", "image/" + "x" * 300, "caf\udce9", "\udcff", "%00",
    "s3://key:secret@bucket/p", "http://[::1", "1" * 5000,
]
# Text as argv can carry it: any character but NUL, and undecodable bytes as surrogate escapes.
TEXT = st.one_of(
    st.sampled_from(AWKWARD),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80),
    st.text(st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)] + list("ab/.-_")), min_size=1, max_size=12),
)
X = object()  # where the generated text goes
UPLOAD = object()
COMMANDS = [
    ["org", "set", X], ["org", "set", "acme", "--retention", X], ["org", "set", "acme", "--retention", "30d", "--by", X],
    ["org", "show", X],
    ["org", "rule", "set", "acme", "--mime", X, "--retention", "7d"], ["org", "rule", "set", "acme", "--mime", "image/*", "--retention", X],
    ["org", "rule", "rm", "acme", "--mime", X], ["org", "rule", "set", X, "--mime", "image/png", "--retention", "7d", "--dry-run"],
    ["register", "--org", X, "--file", UPLOAD], ["register", "--org", "acme", "--file", UPLOAD, "--id", X],
    ["register", "--org", "acme", "--file", UPLOAD, "--ttl", X], ["register", "--org", "acme", "--file", UPLOAD, "--created-at", X],
    ["register", "--org", "acme", "--file", UPLOAD, "--mime", X], ["register", "--org", "acme", "--key", X],
    ["register", "--org", "acme", "--file", X], ["register", "--manifest", X],
    ["lookup", X], ["lookup", X, "--url"], ["lookup", X, "--json"],
    ["hold", X, "--reason", "audit"], ["hold", "img-1", "--reason", X], ["hold", "img-1", "--reason", "audit", "--by", X],
    ["release", "--org", X, "--reason", "done"], ["release", "img-1", "--reason", X],
    ["purge", X, "--dry-run"], ["purge", "--org", X, "--dry-run"], ["purge", "img-2", "--yes", "--by", X],
    ["sweep", "--limit", X], ["sweep", "--dry-run", "--limit", X],
    ["reconcile", "--dry-run", "--grace", X], ["reconcile", "--dry-run", "--by", X], ["reconcile", "--max-orphans", X, "--dry-run"],
    ["verify", "--grace", X], ["verify", "--stuck-after", X], ["verify", "--examples", X],
    ["status", X], ["volume", X], [X], ["db", X],
]
EXIT_CODES = {0, 1, 2, 3}
# Settings whose value names a place to create things (a data dir, a database file, a media root)
# are left out: random text there would make `status` create directories wherever it points. Their
# malformed forms are tried one by one in test_cli.BAD_SETTINGS.
FUZZED_SETTINGS = sorted(
    f"MEDIA_RETENTION_{name.upper()}" for name in Settings.model_fields if name not in ("data_dir", "database_url", "storage_url")
)


@pytest.fixture
def world(cli, tmp_path, data_dir):
    """acme (30d) with img-1 and img-2 registered, and the upload they came from."""
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(b"\xff\xd8 photo")
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    for media_id in ("img-1", "img-2"):
        assert cli("register", "--org", "acme", "--file", str(upload), "--id", media_id).code == 0
    return upload


def check(result, before, after, *, one_line: bool = True) -> None:
    output = result.stdout + result.stderr
    assert result.code in EXIT_CODES, output
    assert "Traceback" not in output, output
    if result.code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 if one_line else all(line.startswith("media-retention: ") for line in lines), result.stderr
        assert after == before, "bad input changed the catalog or the media tree"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(COMMANDS), text=TEXT)
def test_any_argument_gets_an_exit_code_of_the_contract_and_bad_input_changes_nothing(cli, world, data_dir, command, text):
    """exit in {0,1,2,3}; no traceback; exit 2 is one line on stderr with catalog and media unchanged."""
    argv = [text if part is X else str(world) if part is UPLOAD else part for part in command]
    before = snapshot(data_dir)
    result = cli(*argv)
    # A manifest that names a readable file of bad lines (`/etc/passwd`) reports each line by number,
    # as the manifest test below expects; every other refusal is one line.
    check(result, before, snapshot(data_dir), one_line=command[:2] != ["register", "--manifest"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(FUZZED_SETTINGS), text=TEXT)
def test_any_setting_gets_an_exit_code_of_the_contract_and_a_bad_one_changes_nothing(cli, world, data_dir, name, text):
    """Every MEDIA_RETENTION_* setting with arbitrary text, then `status`: same promises."""
    before = snapshot(data_dir)
    os.environ[name] = text
    get_settings.cache_clear()
    try:
        result = cli("status")
    finally:
        del os.environ[name]
        get_settings.cache_clear()
    check(result, before, snapshot(data_dir))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=st.binary(max_size=400) | st.lists(TEXT, max_size=5).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogateescape")))
def test_any_manifest_content_gets_an_exit_code_of_the_contract_and_a_bad_one_imports_nothing(cli, world, data_dir, tmp_path, content):
    """Arbitrary bytes as a manifest: same promises (one line per bad manifest line, then the
    summary); a bad manifest imports nothing."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(content)
    before = snapshot(data_dir)
    result = cli("register", "--manifest", str(manifest))
    check(result, before, snapshot(data_dir), one_line=False)
