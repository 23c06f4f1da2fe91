"""ENOSPC while registering, on a real full filesystem (a small tmpfs mounted for the test)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.faults.conftest import World, record, skip_or_fail

pytestmark = pytest.mark.slow


@pytest.fixture
def small_volume():
    """A 1 MiB tmpfs: a media root that really fills up."""
    where = Path(tempfile.mkdtemp(prefix="mr-enospc-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        where.rmdir()
        skip_or_fail(f"a tmpfs cannot be mounted here ({mounted.stderr.strip()}), so ENOSPC cannot be produced")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)
    where.rmdir()


def test_a_full_volume_fails_register_in_one_sentence_and_leaves_nothing_behind(tmp_path, pg_database, small_volume):
    """register --file and --manifest on a full volume: exit ≠ 0, one sentence, no `.incoming-*` temp
    file, no row; after space is freed the same commands succeed and verify is clean."""
    world = World(tmp_path, pg_database)
    world.media = small_volume / "media"
    world.media.mkdir()
    world.env["MEDIA_RETENTION_STORAGE_URL"] = world.media.as_uri()
    world.seed("base", expired=5, unexpired=5)
    ballast = small_volume / "ballast"
    with open(ballast, "wb", buffering=0) as handle:  # fill the volume to the last block
        with pytest.raises(OSError, match="No space left"):
            while True:
                handle.write(b"\0" * 4096)
    big = tmp_path / "photo.jpg"
    big.write_bytes(b"p" * 200_000)
    manifest = tmp_path / "import.jsonl"
    manifest.write_text("".join(json.dumps({"org": "acme", "id": f"imp-{n}", "file": str(big)}) + "\n" for n in range(3)))
    before = world.states()
    failures = 0
    for args in (("register", "--org", "acme", "--file", str(big), "--id", "one"), ("register", "--manifest", str(manifest), "--files-root", str(tmp_path))):
        result = world.run(*args)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1 and "space" in result.stderr.lower(), result.stderr
        assert not list(world.media.rglob(".incoming-*")), "a failed copy left its temp file"
        assert world.states() == before
        failures += 1
    ballast.unlink()
    world.ok("register", "--org", "acme", "--file", str(big), "--id", "one")
    assert world.ok("register", "--manifest", str(manifest), "--files-root", str(tmp_path))["imported"] == 3
    world.ok("sweep")
    lost, early = world.check_record()
    world.verify_clean()
    record("ENOSPC while registering", "1 MiB tmpfs filled, register --file and --manifest", failures, lost, early,
           "one sentence, exit 1, no temp file or row; re-run after freeing space succeeds, verify clean")
