"""Manifest imports and re-runs: validate everything (database and store) first, import nothing on a
bad manifest, and let the same command succeed again after a crash. SQLite and PostgreSQL, filesystem store."""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.factories import make_file, plant_blob
from worker.catalog import MANIFEST_LINE_MAX, ManifestError
from worker import reservations
from worker.catalog.registration import Registration
from config.errors import BadInput, RetentionError
from worker.models import MediaItem
from worker.store import MARKER_NAME
from worker.store.keys import key_for_id
from worker.verify import Verifier


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


@pytest.fixture
def upload(tmp_path) -> Path:
    return make_file(tmp_path / "uploads", b"\xff\xd8 a photo")


def manifest(path: Path, rows: list) -> Path:
    with open(path, "wb") as handle:
        for row in rows:
            line = row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()
            handle.write(line + b"\n")
    return path


def item_count(catalog) -> int:
    with catalog.db.transaction() as session:
        return session.scalar(select(func.count()).select_from(MediaItem))


def files_under(root: Path) -> set[str]:
    """The blobs under a media root (not its binding marker)."""
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.name != MARKER_NAME}


def bad_lines(excinfo) -> dict[int, str]:
    return {error.line: error.message for error in excinfo.value.errors}


def test_a_key_with_no_blob_after_full_batches_imports_nothing(catalog, acme, upload, media_root, tmp_path):
    """Five good lines (two batches' worth) and then a key the store does not have: nothing is
    imported, no blob is copied in, and the bad line is named."""
    rows = [{"org": acme, "id": f"good-{n}", "file": str(upload)} for n in range(5)]
    rows.append({"org": acme, "id": "ghost", "key": "legacy/never-uploaded.jpg"})
    with pytest.raises(ManifestError) as excinfo:
        catalog.register_manifest(manifest(tmp_path / "m.jsonl", rows), files_root=tmp_path, batch_size=2)
    assert bad_lines(excinfo) == {6: "no blob at storage key 'legacy/never-uploaded.jpg'"}
    assert item_count(catalog) == 0 and files_under(media_root) == set()


def test_every_bad_line_is_reported_by_number_across_batches(catalog, acme, upload, media_root, tmp_path):
    """Store-detected errors in different batches, a key line colliding with a later file line's key,
    and a file line whose target already holds other bytes: each named, nothing imported."""
    plant_blob(media_root, key_for_id("taken"), b"someone else's bytes")
    plant_blob(media_root, "legacy/ok.jpg", b"fine")
    rows = [
        {"org": acme, "id": "a", "key": "legacy/ok.jpg"},
        {"org": acme, "id": "b", "key": "legacy/missing-1.jpg"},
        {"org": acme, "id": "c", "key": key_for_id("d")},
        {"org": acme, "id": "d", "file": str(upload)},
        {"org": acme, "id": "taken", "file": str(upload)},
        {"org": acme, "id": "f", "key": "legacy/missing-2.jpg"},
    ]
    with pytest.raises(ManifestError) as excinfo:
        catalog.register_manifest(manifest(tmp_path / "m.jsonl", rows), files_root=tmp_path, batch_size=2)
    assert bad_lines(excinfo) == {
        2: "no blob at storage key 'legacy/missing-1.jpg'",
        3: f"no blob at storage key {key_for_id('d')!r}",
        4: f"duplicate key {key_for_id('d')!r} (first on line 3)",
        5: f"storage key {key_for_id('taken')!r} already holds a different blob",
        6: "no blob at storage key 'legacy/missing-2.jpg'",
    }
    assert item_count(catalog) == 0
    assert files_under(media_root) == {key_for_id("taken"), "legacy/ok.jpg"}


def test_the_same_manifest_succeeds_again_after_a_crash_mid_import(catalog, acme, upload, media_root, tmp_path, monkeypatch):
    """The second batch is killed after its blobs were copied (no cleanup runs under SIGKILL): the batches
    written beside it commit whole, the killed one leaves no row; re-running the same command imports the
    rest, skips what is already there and adopts the blobs the killed batch wrote; verify finds nothing."""
    path = manifest(tmp_path / "m.jsonl", [{"org": acme, "id": f"item-{n}", "file": str(upload), "ttl": "7d"} for n in range(5)])
    real_insert = Registration._insert

    def killed_in_second_batch(self, items, *rest, **options):
        if any(item.id == "item-2" for item in items):
            raise SystemExit("SIGKILL")
        return real_insert(self, items, *rest, **options)

    monkeypatch.setattr(Registration, "_insert", killed_in_second_batch)
    monkeypatch.setattr(reservations, "release", lambda *args: [])  # a killed process cleans nothing up
    with pytest.raises(SystemExit):
        catalog.register_manifest(path, files_root=tmp_path, batch_size=2)
    monkeypatch.undo()
    with catalog.db.transaction() as session:
        committed = set(session.scalars(select(MediaItem.id)))
    assert committed <= {"item-0", "item-1", "item-4"} and {"item-0", "item-1"} <= committed
    assert len(files_under(media_root)) == 5
    summary = catalog.register_manifest(path, files_root=tmp_path, batch_size=2)
    assert (summary.imported, summary.already_registered) == (5 - len(committed), len(committed))
    assert item_count(catalog) == 5 and len(files_under(media_root)) == 5
    assert Verifier(catalog.db, catalog.store).run(grace=timedelta(days=1), stuck_after=timedelta(days=1)).clean


def raced_manifest(catalog, org, media_root, tmp_path, monkeypatch, lines: int, taken: str) -> Path:
    """A manifest of `lines` key lines (`item-N` at `legacy/N.jpg`) whose line `taken` another process
    registers (at a key of its own) just as the manifest's batch holding it is inserted: after the check
    pass found it free."""
    for number in range(lines):
        plant_blob(media_root, f"legacy/{number}.jpg", b"bytes")
    plant_blob(media_root, "legacy/theirs.jpg", b"theirs")
    path = manifest(tmp_path / "m.jsonl", [{"org": org, "id": f"item-{n}", "key": f"legacy/{n}.jpg"} for n in range(lines)])
    real_insert = Registration._insert

    def raced(self, items, *rest, **options):
        if any(item.id == taken for item in items) and rest[0] is not None:  # the manifest's (audited) batch, not theirs
            catalog.register(org=org, key="legacy/theirs.jpg", media_id=taken)
        return real_insert(self, items, *rest, **options)

    monkeypatch.setattr(Registration, "_insert", raced)
    return path


def catalog_rows(catalog) -> dict[str, str]:
    with catalog.db.transaction() as session:
        return dict(session.execute(select(MediaItem.id, MediaItem.storage_key)).all())


def test_a_line_registered_by_someone_else_after_the_check_fails_only_its_own_batch(catalog, acme, media_root, tmp_path,
                                                                                   monkeypatch):
    """Between the check pass and the import, another process registers one line's ID: that line's batch
    fails whole with a clear error (the catalog's unique key decides, no line is half-imported), the
    batches beside it commit whole, and the other process's row is left as it was. The import has then
    changed something, so it is a failure (exit 1), not bad input (exit 2, which promises no change)."""
    path = raced_manifest(catalog, acme, media_root, tmp_path, monkeypatch, lines=6, taken="item-3")
    with pytest.raises(RetentionError, match="registered concurrently; nothing in this batch was imported; "
                                             r"\d items of the manifest were imported before it") as excinfo:
        catalog.register_manifest(path, files_root=tmp_path, batch_size=2)
    assert excinfo.value.exit_code == 1 and not isinstance(excinfo.value, BadInput)
    rows = catalog_rows(catalog)
    assert rows["item-3"] == "legacy/theirs.jpg" and "item-2" not in rows
    assert {"item-0", "item-1"} <= rows.keys() <= {"item-0", "item-1", "item-3", "item-4", "item-5"}


def test_a_race_in_a_manifests_only_batch_is_bad_input_and_changes_nothing(catalog, acme, media_root, tmp_path, monkeypatch):
    """The same race in a manifest of one batch: nothing of it was imported, so it stays bad input (exit 2)."""
    path = raced_manifest(catalog, acme, media_root, tmp_path, monkeypatch, lines=3, taken="item-1")
    with pytest.raises(BadInput, match="registered concurrently; nothing in this batch was imported.$"):
        catalog.register_manifest(path, files_root=tmp_path)
    assert catalog_rows(catalog) == {"item-1": "legacy/theirs.jpg"}


def test_an_already_registered_id_with_other_content_is_a_bad_line(catalog, acme, upload, tmp_path):
    """Re-running is only skipping when the line describes what is registered; otherwise it is a clash."""
    catalog.register(org=acme, file=upload, media_id="img-1", ttl="7d")
    with pytest.raises(ManifestError) as excinfo:
        catalog.register_manifest(manifest(tmp_path / "m.jsonl", [{"org": acme, "id": "img-1", "file": str(upload), "ttl": "1d"}]), files_root=tmp_path)
    assert bad_lines(excinfo) == {1: "media id 'img-1' already exists with other content"}


def test_register_file_again_adopts_the_identical_blob_a_killed_run_left(catalog, acme, upload, media_root):
    """The blob at the ID's key holds exactly the file's bytes and no row claims it: adopted, not refused."""
    plant_blob(media_root, key_for_id("img-9"), upload.read_bytes())
    item = catalog.register(org=acme, file=upload, media_id="img-9")
    assert (item.size, catalog.lookup("img-9").state) == (upload.stat().st_size, "active")


def test_register_file_refuses_a_different_blob_at_its_key_and_leaves_it(catalog, acme, upload, media_root):
    """Same key, other bytes: refused with a sentence, the stored blob untouched, nothing registered."""
    stored = plant_blob(media_root, key_for_id("img-9"), b"other bytes")
    with pytest.raises(BadInput, match="already holds a different blob"):
        catalog.register(org=acme, file=upload, media_id="img-9")
    assert stored.read_bytes() == b"other bytes" and item_count(catalog) == 0


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_without_blocking(catalog, acme, tmp_path, kind):
    """A FIFO with no writer would block a plain open forever; /dev/zero would never end."""
    path = {"fifo": tmp_path / "m.fifo", "directory": tmp_path, "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(pytest.raises(BadInput, catalog.register_manifest, path).value), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "register_manifest blocked on a non-regular file"
    assert "is not a regular file" in str(outcome[0])


def test_lines_too_long_not_utf8_or_nested_too_deep_are_bad_lines_not_crashes(catalog, acme, upload, tmp_path):
    """Each is reported by number; the good line after them is still checked, nothing imported."""
    rows = [
        b'{"org": "acme", "id": "x", "file": "' + b"a" * (MANIFEST_LINE_MAX + 10) + b'"}',
        b'{"org": "acme", "id": "caf\xe9"}',
        b"[" * 60_000,
        {"org": acme, "id": "fine", "file": str(upload)},
    ]
    with pytest.raises(ManifestError) as excinfo:
        catalog.register_manifest(manifest(tmp_path / "m.jsonl", rows), files_root=tmp_path)
    assert bad_lines(excinfo) == {1: "longer than 64 KiB", 2: "not valid UTF-8", 3: "not valid JSON (nested too deeply)"}
    assert item_count(catalog) == 0
