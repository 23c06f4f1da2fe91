"""What `register` and `adopt` will read, as an operator types them (the installed script, in a subprocess):
a manifest is data another system may produce, so its `file` lines are confined to the directory the
operator names (`--files-root`; by default the manifest's own directory), and nothing but a regular file of a real filesystem is ever read."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.support import snapshot

pytestmark = pytest.mark.slow


@pytest.fixture
def acme(shell) -> None:
    assert shell("org", "set", "acme", "--retention", "30d").code == 0


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    """The files root: one photo in it, a secret beside it (outside), and a symlink from inside to the secret."""
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
    (tmp_path / "secret.txt").write_text("DATABASE_PASSWORD=hunter2\n")
    (root / "innocent.jpg").symlink_to(tmp_path / "secret.txt")
    return root


def write_manifest(path: Path, rows: list) -> Path:
    """A JSON-lines manifest: dicts as JSON, strings as they are (to write lines json.dumps never would)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def bad_lines(stderr: str) -> dict[int, str]:
    """{line number: message} of the manifest's bad lines as reported on stderr."""
    reported = {}
    for line in stderr.splitlines():
        if ": line " in line:
            number, _, message = line.split(": line ", 1)[1].partition(": ")
            reported[int(number)] = message
    return reported


def test_a_manifest_line_that_gives_a_field_twice_is_refused_by_number_and_imports_nothing(shell, acme, data_dir, tmp_path):
    """`{"org": "acme", ..., "org": "globex"}` is not "the last one wins": the line is bad, exit 2, nothing imported."""
    (data_dir / "media" / "legacy").mkdir(parents=True)
    for name in ("a", "b"):
        (data_dir / "media" / "legacy" / name).write_bytes(b"blob")
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"org": "acme", "id": "first", "key": "legacy/a"},
        '{"org": "acme", "id": "second", "key": "legacy/b", "org": "globex"}',
        '{"org": "acme", "id": "third", "key": "legacy/b", "mime": {"type": "image/png", "type": "x"}}',
    ])
    before = snapshot(data_dir)
    result = shell("register", "--manifest", str(manifest))
    assert result.code == 2, result.stderr
    assert bad_lines(result.stderr) == {2: "field 'org' appears more than once", 3: "field 'type' appears more than once"}
    assert result.stderr.splitlines()[-1].startswith("media-retention: manifest line 2: field 'org' appears more than once")
    assert snapshot(data_dir) == before


def test_file_lines_are_confined_to_the_manifests_own_directory_unless_a_files_root_is_named(shell, acme, data_dir, uploads,
                                                                                            tmp_path):
    """Without --files-root a `file` line is read from the manifest's own directory (where relative paths were
    always read from) and nothing outside it; --files-root names another directory; a manifest in / has no
    default root, so its `file` lines are bad lines."""
    elsewhere = tmp_path / "manifests"
    elsewhere.mkdir()
    manifest = write_manifest(elsewhere / "m.jsonl", [{"org": "acme", "id": "photo-1", "file": str(uploads / "photo.jpg")}])
    before = snapshot(data_dir)
    refused = shell("register", "--manifest", str(manifest))
    assert refused.code == 2
    assert bad_lines(refused.stderr) == {1: f"file {str(uploads / 'photo.jpg')!r} is outside the files root {str(elsewhere)!r}"}
    assert snapshot(data_dir) == before

    beside = write_manifest(uploads / "m.jsonl", [{"org": "acme", "id": "photo-2", "file": "photo.jpg"},
                                                  {"org": "acme", "id": "secret", "file": "../secret.txt"}])
    refused = shell("register", "--manifest", str(beside))
    assert refused.code == 2 and sorted(bad_lines(refused.stderr)) == [2]
    assert snapshot(data_dir) == before
    write_manifest(beside, [{"org": "acme", "id": "photo-2", "file": "photo.jpg"}])
    imported = shell("register", "--manifest", str(beside), "--json")
    assert imported.code == 0, imported.stderr
    assert shell("lookup", "photo-2", "--json").json["size"] == len(b"\xff\xd8 a photo")

    imported = shell("register", "--manifest", str(manifest), "--files-root", str(uploads), "--json")
    assert imported.code == 0, imported.stderr
    assert shell("lookup", "photo-1", "--json").json["size"] == len(b"\xff\xd8 a photo")


def test_file_lines_that_resolve_outside_the_files_root_are_refused_each_by_number(shell, acme, data_dir, uploads, tmp_path):
    """`..`, absolute paths (/etc/shadow, /proc/self/environ) and a symlink inside the root pointing out of it are
    each a bad line; the good line beside them is not imported either, and no secret is echoed."""
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"org": "acme", "id": "good", "file": "photo.jpg"},
        {"org": "acme", "id": "dotdot", "file": "../secret.txt"},
        {"org": "acme", "id": "shadow", "file": "/etc/shadow"},
        {"org": "acme", "id": "environ", "file": "/proc/self/environ"},
        {"org": "acme", "id": "link", "file": "innocent.jpg"},
        {"org": "acme", "id": "absolute-inside", "file": str(uploads / "photo.jpg")},
    ])
    before = snapshot(data_dir)
    result = shell("register", "--manifest", str(manifest), "--files-root", str(uploads))
    assert result.code == 2
    reported = bad_lines(result.stderr)
    assert sorted(reported) == [2, 3, 4, 5]
    assert all(message.startswith("file ") and "is outside the files root" in message for message in reported.values())
    assert "hunter2" not in result.stderr + result.stdout
    assert snapshot(data_dir) == before


def test_files_inside_the_root_that_are_not_regular_files_are_refused_without_blocking(shell, acme, data_dir, tmp_path):
    """A FIFO (no writer), a socket and a /proc file (its root named /proc/self) are bad lines: exit 2 at once."""
    root = tmp_path / "odd"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.jpg"))
    try:
        odd = write_manifest(tmp_path / "odd.jsonl", [{"org": "acme", "id": "pipe", "file": "pipe.jpg"},
                                                      {"org": "acme", "id": "sock", "file": "sock.jpg"}])
        environ = write_manifest(tmp_path / "environ.jsonl", [{"org": "acme", "id": "environ", "file": "environ"}])
        before = snapshot(data_dir)
        started = time.monotonic()
        result = shell("register", "--manifest", str(odd), "--files-root", str(root), timeout=30)
        assert result.code == 2
        assert bad_lines(result.stderr) == {1: f"file {str(root / 'pipe.jpg')!r} is not a regular file (a FIFO)",
                                            2: f"file {str(root / 'sock.jpg')!r} is not a regular file (a socket)"}
        assert time.monotonic() - started < 20
        proc = shell("register", "--manifest", str(environ), "--files-root", "/proc/self")
        assert proc.code == 2
        assert "is not a regular file (a file of the kernel's proc filesystem, not media)" in proc.stderr
        assert snapshot(data_dir) == before
    finally:
        listener.close()


@pytest.mark.parametrize(("arguments", "sentence"), [
    (["--files-root", "{uploads}"], "--files-root goes with --manifest"),
    (["--manifest", "{manifest}", "--files-root", "/"], "--files-root / confines nothing"),
    (["--manifest", "{manifest}", "--files-root", "{uploads}/photo.jpg"], "is not a directory"),
    (["--manifest", "{manifest}", "--files-root", "{uploads}/missing"], "is not a directory"),
], ids=["without a manifest", "the whole filesystem", "a file", "missing"])
def test_a_files_root_that_confines_nothing_or_is_no_directory_is_bad_usage(shell, acme, data_dir, uploads, tmp_path,
                                                                           arguments, sentence):
    """Exit 2 and one sentence on stderr; nothing imported."""
    manifest = write_manifest(tmp_path / "m.jsonl", [{"org": "acme", "id": "photo-1", "file": "photo.jpg"}])
    before = snapshot(data_dir)
    typed = [argument.format(uploads=uploads, manifest=manifest) for argument in arguments]
    result = shell("register", *(["--org", "acme"] if "--manifest" not in typed else []), *typed)
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and sentence in result.stderr, result.stderr
    assert snapshot(data_dir) == before


@pytest.mark.parametrize(("path", "kind"), [("/proc/self/environ", "a file of the kernel's proc filesystem"),
                                            ("/dev/zero", "a device"), ("{fifo}", "a FIFO")],
                         ids=["/proc/self/environ", "a device", "a FIFO"])
def test_register_file_refuses_anything_but_a_regular_file_in_one_sentence(shell, acme, data_dir, tmp_path, path, kind):
    """`register --file` takes any path the operator types, but reads only regular files of real filesystems."""
    os.mkfifo(tmp_path / "pipe")
    before = snapshot(data_dir)
    result = shell("register", "--org", "acme", "--file", path.format(fifo=tmp_path / "pipe"), "--id", "x", timeout=30)
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and f"is not a regular file ({kind}" in result.stderr
    assert snapshot(data_dir) == before


def test_register_file_through_a_symlink_the_operator_typed_still_works(shell, acme, tmp_path):
    """The operator's own path is their choice: a symlink to a regular file registers its bytes."""
    (tmp_path / "real.jpg").write_bytes(b"real bytes")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    result = shell("register", "--org", "acme", "--file", str(tmp_path / "link.jpg"), "--id", "linked", "--json")
    assert result.code == 0, result.stderr
    assert shell("lookup", "linked", "--json").json["size"] == len(b"real bytes")


def test_adopt_takes_regular_files_only_never_a_fifo_socket_or_symlink_in_the_media_root(shell, acme, data_dir, tmp_path):
    """In the media root, a FIFO, a socket and a symlink to a secret outside are left alone; the photo is adopted."""
    legacy = data_dir / "media" / "legacy"
    legacy.mkdir(parents=True)
    (legacy / "photo.jpg").write_bytes(b"old photo")
    (tmp_path / "secret.txt").write_text("DATABASE_PASSWORD=hunter2\n")
    (legacy / "secret.jpg").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(legacy / "pipe.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(legacy / "sock.jpg"))
    try:
        an_hour_ago = time.time() - 3600
        for name in ("photo.jpg", "pipe.jpg", "sock.jpg"):
            os.utime(legacy / name, (an_hour_ago, an_hour_ago))
        result = shell("adopt", "--org", "acme", "--yes", "--json", timeout=30)
        assert result.code == 0, result.stderr
        assert (result.json["listed"], result.json["adopted"]) == (1, 1)
        assert shell("org", "show", "acme", "--json").json["items"]["active"] == 1
    finally:
        listener.close()
