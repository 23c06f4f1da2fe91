"""The command line contract: outputs, exit codes (0/1/2/3) and "bad input changes nothing"."""

import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from config.settings import get_settings
from tests.e2e.support import snapshot
from tests.factories import database_time, plant_blob, wait_until_older


@pytest.fixture
def seeded(cli, tmp_path, data_dir):
    """An org `acme` (30d) with one active item `img-1`."""
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(b"\xff\xd8 photo")
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    result = cli("register", "--org", "acme", "--file", str(upload), "--id", "img-1", "--json")
    assert result.code == 0, result.stderr
    return upload


def test_register_prints_the_item_with_its_expiry(cli, seeded, tmp_path):
    """register --json prints id, org, key, size, created_at, expires_at and state."""
    result = cli("register", "--org", "acme", "--file", str(seeded), "--id", "img-2", "--ttl", "1h",
                 "--created-at", "2026-01-01T00:00:00Z", "--json")
    item = result.json
    assert result.code == 0
    assert {k: item[k] for k in ("id", "org", "size", "created_at", "expires_at", "state")} == {
        "id": "img-2", "org": "acme", "size": 8, "created_at": "2026-01-01T00:00:00+00:00",
        "expires_at": "2026-01-01T01:00:00+00:00", "state": "active"}
    assert item["key"].endswith("/img-2") and item["mime"] == "image/jpeg"


def test_lookup_answers_zero_while_active_and_three_with_a_404_body_once_gone(cli, seeded):
    """lookup exits 0 with the item, then 3 with {status: 404, error: gone, reason} after a purge."""
    active = cli("lookup", "img-1", "--json")
    assert (active.code, active.json["state"]) == (0, "active")
    assert cli("purge", "img-1", "--yes", "--json").code == 0
    gone = cli("lookup", "img-1", "--json")
    assert gone.code == 3
    assert {k: gone.json[k] for k in ("id", "status", "error", "reason")} == {"id": "img-1", "status": 404, "error": "gone", "reason": "purge"}
    assert gone.json["deleted_at"]


def test_lookup_of_an_item_past_its_expiry_exits_three_with_the_gone_body_before_any_sweep(cli, data_dir, database,
                                                                                            monkeypatch, tmp_path):
    """On SQLite and PostgreSQL, unswept: an item past its TTL (database clock) exits 3 with gone/ttl/expired and
    deleted_at its expiry; a TTL-less one does after `org set` shortens the retention (retention); a hold placed
    afterwards answers gone (exit 3) and changes nothing: expired is final."""
    monkeypatch.setenv("MEDIA_RETENTION_DATABASE_URL", database.url)
    get_settings.cache_clear()
    upload = tmp_path / "voice.ogg"
    upload.write_bytes(b"OggS voice")
    now = database_time(database)
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    voice = cli("register", "--org", "acme", "--file", str(upload), "--id", "voice-1", "--ttl", "1h",
                "--created-at", (now - timedelta(hours=2)).isoformat(), "--json")
    photo = cli("register", "--org", "acme", "--file", str(upload), "--id", "photo-1",
                "--created-at", (now - timedelta(days=10)).isoformat(), "--json")
    assert (voice.code, photo.code) == (0, 0), voice.stderr + photo.stderr

    gone = cli("lookup", "voice-1", "--json")
    assert (gone.code, gone.json) == (3, {"id": "voice-1", "status": 404, "error": "gone", "reason": "ttl",
                                          "deleted_at": voice.json["expires_at"], "state": "expired"})
    assert "gone" in gone.stderr
    assert cli("lookup", "photo-1", "--json").code == 0
    assert cli("org", "set", "acme", "--retention", "7d").code == 0
    retention = cli("lookup", "photo-1", "--json")
    assert retention.code == 3 and (retention.json["reason"], retention.json["state"]) == ("retention", "expired")
    late_hold = cli("hold", "voice-1", "--reason", "legal")  # expired is final: a hold cannot bring it back
    assert late_hold.code == 3 and "expired at" in late_hold.stderr and "gone" in late_hold.stderr
    assert cli("lookup", "voice-1", "--json").code == 3


def test_lookup_of_an_unknown_id_exits_three_with_not_found(cli, seeded):
    """An ID never seen answers 404 not_found, distinguishable from gone."""
    result = cli("lookup", "nobody", "--json")
    assert (result.code, result.json) == (3, {"id": "nobody", "status": 404, "error": "not_found"})


def test_org_show_reports_retention_and_counts(cli, seeded):
    """org show gives the retention in short form and item counts by state."""
    result = cli("org", "show", "acme", "--json")
    assert result.code == 0
    assert (result.json["retention"], result.json["items"]["active"]) == ("30d", 1)
    assert cli("org", "show", "ghost").code == 3


BAD_INPUTS = [
    ("ttl of 30 minutes", ["register", "--org", "acme", "--file", "{upload}", "--ttl", "30m"], "between 1h and 30d"),
    ("ttl of 31 days", ["register", "--org", "acme", "--file", "{upload}", "--ttl", "31d"], "between 1h and 30d"),
    ("malformed ttl", ["register", "--org", "acme", "--file", "{upload}", "--ttl", "soon"], "malformed duration"),
    ("malformed retention", ["org", "set", "acme", "--retention", "P1M"], "months"),
    ("retention under an hour", ["org", "set", "acme", "--retention", "59m"], "at least 1h"),
    ("unknown org", ["register", "--org", "ghost", "--file", "{upload}"], "does not exist"),
    ("id with a slash", ["register", "--org", "acme", "--file", "{upload}", "--id", "a/b"], "invalid media id"),
    ("id of dots", ["register", "--org", "acme", "--file", "{upload}", "--id", ".."], "invalid media id"),
    ("id with NUL", ["register", "--org", "acme", "--file", "{upload}", "--id", "a\x00b"], "invalid media id"),
    ("key with ..", ["register", "--org", "acme", "--key", "../outside/victim"], "'..'"),
    ("absolute key", ["register", "--org", "acme", "--key", "/etc/passwd"], "absolute"),
    ("key with NUL", ["register", "--org", "acme", "--key", "ab\x00cd"], "NUL"),
    ("key through a symlinked directory", ["register", "--org", "acme", "--key", "escape/victim"], "symlink"),
    ("key with no blob", ["register", "--org", "acme", "--key", "no/such/blob"], "no blob"),
    ("duplicate id", ["register", "--org", "acme", "--file", "{upload}", "--id", "img-1"], "already exists"),
    ("file and key together", ["register", "--org", "acme", "--file", "{upload}", "--key", "x"], "exactly one"),
    ("missing file", ["register", "--org", "acme", "--file", "/nonexistent/f.jpg"], "does not exist"),
    ("malformed created-at", ["register", "--org", "acme", "--file", "{upload}", "--created-at", "yesterday"], "ISO-8601"),
    ("bad mime", ["register", "--org", "acme", "--file", "{upload}", "--mime", "jpeg"], "MIME"),
    ("sweep limit zero", ["sweep", "--limit", "0"], "0"),
    ("purge without --yes", ["purge", "img-1"], "--yes"),
    ("purge of ids and org", ["purge", "img-1", "--org", "acme", "--yes"], "not both"),
    ("hold without a reason", ["hold", "img-1"], "--reason"),
    ("hold with an empty reason", ["hold", "img-1", "--reason", " "], "reason"),
    ("lookup with a slash", ["lookup", "../img-1"], "invalid media id"),
    ("unknown option", ["sweep", "--now"], "--now"),
    ("manifest with other options", ["register", "--manifest", "{upload}", "--org", "acme"], "no other"),
    ("huge retention", ["org", "set", "acme", "--retention", "99999999999999999999d"], "too long"),
    ("huge iso retention", ["org", "set", "acme", "--retention", "P99999999999999999D"], "too long"),
    ("retention past the column", ["org", "set", "acme", "--retention", "24856d"], "at most"),
    ("huge ttl", ["register", "--org", "acme", "--file", "{upload}", "--ttl", "99999999999999999999d"], "too long"),
    ("huge grace", ["reconcile", "--grace", "99999999999999999999d"], "too long"),
    ("thousands of digits", ["org", "set", "acme", "--retention", "9" * 5000 + "d"], "too long"),
    ("created in year 9999", ["register", "--org", "acme", "--file", "{upload}", "--created-at", "9999-12-31T23:59:59Z"], "future"),
    ("created in year 1", ["register", "--org", "acme", "--file", "{upload}", "--created-at", "0001-01-01T00:00:00Z"], "1970"),
    ("created in year 1 east of UTC", ["register", "--org", "acme", "--file", "{upload}", "--created-at", "0001-01-01T00:00:00+01:00"], "created-at"),
    ("created two hours ahead", ["register", "--org", "acme", "--file", "{upload}", "--created-at", "{in_two_hours}"], "future"),
    ("key component over 255 bytes", ["register", "--org", "acme", "--key", "legacy/" + "a" * 256], "255 bytes"),
    ("key that is not UTF-8", ["register", "--org", "acme", "--key", "legacy/caf\udce9"], "UTF-8"),
    ("key with a newline", ["register", "--org", "acme", "--key", "legacy/a\nb"], "control"),
    ("mime over 255 characters", ["register", "--org", "acme", "--file", "{upload}", "--mime", "image/" + "a" * 250], "255"),
    ("mime with a trailing newline", ["register", "--org", "acme", "--file", "{upload}", "--mime", "image/jpeg\n"], "MIME"),
    ("id with a trailing newline", ["register", "--org", "acme", "--file", "{upload}", "--id", "img-9\n"], "invalid media id"),
    ("lookup with a trailing newline", ["lookup", "img-1\n"], "invalid media id"),
    ("org with a trailing newline", ["org", "set", "acme\n"], "invalid organization id"),
    ("--by longer than the column", ["org", "set", "acme", "--retention", "2d", "--by", "x" * 129], "128"),
    ("--by that is not UTF-8", ["hold", "img-1", "--reason", "r", "--by", "\udcff"], "UTF-8"),
    ("reason of 3000 characters", ["hold", "img-1", "--reason", "r" * 3000], "2000"),
    ("verify examples out of range", ["verify", "--examples", "1000000"], "1000000"),
    ("compact with no age", ["compact"], "--older-than"),
    ("compact younger than a day", ["compact", "--older-than", "23h"], "1d"),
    ("compact with a bad age", ["compact", "--older-than", "soon"], "malformed duration"),
]


@pytest.mark.parametrize(("case", "argv", "message"), BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input_is_one_sentence_exit_two_and_changes_nothing(cli, seeded, data_dir, tmp_path, case, argv, message):
    """Each bad input: exit 2, one line on stderr naming the problem, catalog and media byte-for-byte unchanged."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    os.symlink(outside, data_dir / "media" / "escape")
    before = snapshot(data_dir)
    in_two_hours = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    result = cli(*[arg.replace("{upload}", str(seeded)).replace("{in_two_hours}", in_two_hours) for arg in argv])
    assert result.code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("media-retention: "), result.stderr
    assert message in lines[0]
    assert snapshot(data_dir) == before
    assert (outside / "victim").read_bytes() == b"precious"


BAD_SETTINGS = [
    ("MEDIA_RETENTION_TOMBSTONE_RETENTION", "1h", "at least 1d"),
    ("MEDIA_RETENTION_WATCH_INTERVAL", "1h", "10 minutes"),
    ("MEDIA_RETENTION_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
    ("MEDIA_RETENTION_STORAGE_URL", "file:///srv/media%00evil", "NUL"),
    ("MEDIA_RETENTION_STORAGE_URL", "file://relative/path", "file:///"),
    ("MEDIA_RETENTION_STORAGE_URL", "ftp://host/media", "file:///"),
    ("MEDIA_RETENTION_DATA_DIR", "{a_file}", "not a directory"),
    ("MEDIA_RETENTION_DATABASE_URL", "postgresql://user@db:port/x", "SQLAlchemy"),
    ("MEDIA_RETENTION_DATABASE_URL", "not a url at all", "SQLAlchemy"),
    ("MEDIA_RETENTION_DEFAULT_RETENTION", "99999999999999999999d", "too long"),
    ("MEDIA_RETENTION_DEFAULT_RETENTION", "25000d", "at most"),
    ("MEDIA_RETENTION_SWEEP_INTERVAL", "P99999999999999999D", "too long"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS, ids=[f"{n}={v[:20]}" for n, v, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_sentence_exit_two_and_changes_nothing(cli, seeded, data_dir, tmp_path, monkeypatch, name, value, message):
    """Every command refuses a malformed setting before it touches anything."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    before = snapshot(data_dir)
    monkeypatch.setenv(name, value.replace("{a_file}", str(a_file)))
    get_settings.cache_clear()
    result = cli("status")
    assert result.code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and message in lines[0], result.stderr
    assert snapshot(data_dir) == before and a_file.read_text() == "not a directory"


def write_manifest(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_manifest_imports_every_line_in_batches(cli, seeded, tmp_path, data_dir):
    """A 4,500-line manifest mixing copied files and adopted keys imports all of them, a batch of 2,000 at a
    time, with a progress event per batch."""
    blobs = data_dir / "media" / "legacy"
    blobs.mkdir()
    # A day ago with a 2-day TTL: not expired, so the lookup below answers with the item.
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for n in range(4500):
        if n % 2:
            (blobs / f"b{n}").write_bytes(b"x" * n)
            rows.append({"org": "acme", "id": f"m{n}", "key": f"legacy/b{n}", "ttl": "2d", "created_at": yesterday})
        else:
            rows.append({"org": "acme", "id": f"m{n}", "file": str(seeded), "mime": "image/jpeg"})
    result = cli("register", "--manifest", str(write_manifest(tmp_path / "m.jsonl", rows)), "--files-root", str(seeded.parent), "--json")
    assert result.code == 0, result.stderr
    assert result.json["imported"] == 4500
    assert [n for n in (2000, 4000, 4500) if f"imported {n} items" in result.stderr] == [2000, 4000, 4500]
    assert cli("org", "show", "acme", "--json").json["items"]["active"] == 4501
    assert cli("lookup", "m7", "--json").json["size"] == 7


def test_manifest_with_bad_lines_reports_each_by_number_and_imports_nothing(cli, seeded, tmp_path, data_dir):
    """Duplicate IDs, bad TTLs, unknown orgs and junk lines are each reported with their line; nothing is imported."""
    rows = [
        {"org": "acme", "id": "ok-1", "file": str(seeded)},
        {"org": "acme", "id": "dup", "file": str(seeded)},
        {"org": "acme", "id": "dup", "file": str(seeded)},
        {"org": "acme", "id": "short", "file": str(seeded), "ttl": "30m"},
        "not json",
        {"org": "ghost", "id": "orphan", "file": str(seeded)},
        {"org": "acme", "id": "evil", "key": "../../etc/passwd"},
        {"org": "acme", "id": "nul", "key": "a\u0000b"},
        {"org": "acme", "id": "img-1", "file": str(seeded), "ttl": "1d"},
    ]
    before = snapshot(data_dir)
    result = cli("register", "--manifest", str(write_manifest(tmp_path / "bad.jsonl", rows)), "--files-root", str(seeded.parent))
    assert result.code == 2
    reported = [line.split(": line ")[1].split(":")[0] for line in result.stderr.splitlines() if ": line " in line]
    assert reported == ["3", "4", "5", "6", "7", "8", "9"]
    assert "duplicate id 'dup' (first on line 2)" in result.stderr
    assert "media id 'img-1' already exists with other content" in result.stderr
    assert snapshot(data_dir) == before


def test_hold_and_release_round_trip_through_the_cli(cli, seeded):
    """hold marks the item held, release clears it; both report who and why."""
    held = cli("hold", "img-1", "--reason", "legal", "--by", "alice", "--json")
    assert (held.code, held.json["changed"], held.json["actor"]) == (0, ["img-1"], "alice")
    assert cli("lookup", "img-1", "--json").json["held"] is True
    assert cli("release", "img-1", "--reason", "done", "--json").code == 0
    assert cli("lookup", "img-1", "--json").json["held"] is False


def test_hold_of_an_unknown_id_exits_three_and_holds_nothing(cli, seeded, data_dir):
    """Holding [img-1, ghost] fails on ghost and leaves img-1 unheld."""
    before = snapshot(data_dir)
    assert cli("hold", "img-1", "ghost", "--reason", "x").code == 3
    assert snapshot(data_dir) == before


def test_sweep_json_reports_the_documented_counts(cli, seeded):
    """sweep --json prints claimed, deleted, bytes_freed, failed and held_skipped."""
    result = cli("sweep", "--json")
    assert result.code == 0
    assert {"claimed", "deleted", "bytes_freed", "failed", "held_skipped"} <= result.json.keys()


def test_walkthrough_from_the_readme_deletes_an_expired_file(shell, tmp_path, data_dir):
    """The README's newcomer walk-through, run as a user would: register an hour-TTL file created
    two hours ago, sweep, see the file gone and lookup answer 404 with exit 3."""
    upload = tmp_path / "hello.txt"
    upload.write_text("hello")
    assert shell("org", "set", "acme", "--retention", "90d").code == 0
    item = shell("register", "--org", "acme", "--file", str(upload), "--id", "hello-1", "--ttl", "1h",
                 "--created-at", "2020-01-01T00:00:00Z", "--json")
    assert item.code == 0, item.stderr
    blob = data_dir / "media" / item.json["key"]
    assert blob.read_text() == "hello"
    swept = shell("sweep", "--json")
    assert (swept.code, swept.json["deleted"]) == (0, 1), swept.stderr
    assert not blob.exists()
    lookup = shell("lookup", "hello-1")
    assert lookup.code == 3
    assert json.loads(lookup.stdout)["status"] == 404
    assert "gone" in lookup.stderr


def test_reconcile_cli_deletes_an_old_orphan_and_reports_json(cli, seeded, data_dir):
    """`reconcile --json` removes a stray blob older than the grace and keeps registered media."""
    stray = plant_blob(data_dir / "media", "stray.bin", b"left behind")
    wait_until_older([stray], timedelta(seconds=1))
    result = cli("reconcile", "--grace", "1s", "--json")
    assert result.code == 0, result.stderr
    assert (result.json["orphans_deleted"], result.json["orphan_keys"]) == (1, ["stray.bin"])
    assert not stray.exists()
    assert cli("lookup", "img-1").code == 0


def test_reconcile_with_a_malformed_grace_is_bad_input(cli, seeded, data_dir):
    """A grace that is not a duration exits 2 and deletes nothing."""
    before = snapshot(data_dir)
    assert cli("reconcile", "--grace", "soon").code == 2
    assert snapshot(data_dir) == before


def test_sweep_dry_run_in_text_shows_what_is_due_and_deletes_nothing(cli, seeded, tmp_path, data_dir):
    """The human dry run leads with due items and bytes and names them; the blob stays."""
    upload = tmp_path / "old.jpg"
    upload.write_bytes(b"12345")
    cli("register", "--org", "acme", "--file", str(upload), "--id", "old-1", "--ttl", "1h", "--created-at", "2020-01-01T00:00:00Z")
    before = snapshot(data_dir)
    result = cli("sweep", "--dry-run")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert lines[:3] == ["dry run: nothing was deleted", "due: 1", "due_bytes: 5"]
    assert "old-1" in result.stdout and "claimed" not in result.stdout
    assert snapshot(data_dir) == before


DANGEROUS_ROOTS = [
    ("the filesystem root", "file:///", "system directory"),
    ("/etc", "file:///etc", "system directory"),
    ("below /usr", "file:///usr/share/doc", "system directory"),
    ("/var itself", "file:///var", "system directory"),
    ("/tmp itself", "file:///tmp", "system directory"),
    ("/home itself", "file:///home", "system directory"),
    ("below /proc", "file:///proc/self", "system directory"),
    ("the data dir", "file://{data_dir}", "catalog"),
    ("a parent of the data dir", "file://{parent}", "catalog"),
]


@pytest.mark.parametrize(("case", "url", "message"), DANGEROUS_ROOTS, ids=[case for case, _, _ in DANGEROUS_ROOTS])
def test_a_dangerous_media_root_is_refused_before_anything_is_touched(cli, seeded, data_dir, tmp_path, monkeypatch, case, url, message):
    """reconcile would delete everything under the root that no item names: roots holding the system or the catalog are refused.

    Only commands that change nothing are run here (reconcile with --dry-run): this test points the
    worker at /etc, and must stay harmless on code that lacks the protection it checks."""
    before = snapshot(data_dir)
    monkeypatch.setenv("MEDIA_RETENTION_STORAGE_URL", url.format(data_dir=data_dir, parent=data_dir.parent))
    get_settings.cache_clear()
    for command in (("reconcile", "--dry-run", "--grace", "1s"), ("verify",), ("status",)):
        result = cli(*command)
        assert result.code == 2, (command, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    assert snapshot(data_dir) == before


def test_a_media_root_holding_a_sqlite_catalog_elsewhere_is_refused(cli, seeded, data_dir, tmp_path, monkeypatch):
    """The catalog named by DATABASE_URL counts too, wherever it lives."""
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    monkeypatch.setenv("MEDIA_RETENTION_DATABASE_URL", f"sqlite:///{elsewhere / 'catalog.sqlite3'}")
    monkeypatch.setenv("MEDIA_RETENTION_STORAGE_URL", elsewhere.as_uri())
    get_settings.cache_clear()
    result = cli("status")
    assert result.code == 2 and "catalog" in result.stderr
    assert not (elsewhere / "catalog.sqlite3").exists()
