"""A shard directory the sweep may not change (immutable: `chattr +i`, EPERM even for root)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from sqlalchemy import select

from tests.faults.conftest import record, skip_or_fail
from worker.models import MediaItem, State

pytestmark = pytest.mark.slow


def test_an_immutable_shard_fails_only_its_items_and_a_later_sweep_deletes_them(world_factory):
    """With one shard directory immutable, the sweep deletes everything else; the shard's items stay
    `deleting` with `last_error` and a backoff lease. Once the flag is cleared, a sweep after the
    backoff deletes them and verify is clean."""
    if not shutil.which("chattr"):
        skip_or_fail("chattr (e2fsprogs) is not installed, so an immutable directory cannot be made")
    world = world_factory(sweep_batch_size="20")
    world.seed("base", expired=150, unexpired=60, held=30)
    doomed = sorted(world.record.doomed)
    shard = (world.media / world.record.keys[doomed[0]]).parent
    locked = {m for m in doomed if (world.media / world.record.keys[m]).parent == shard}
    flagged = subprocess.run(["chattr", "+i", str(shard)], capture_output=True, text=True)
    if flagged.returncode != 0:
        skip_or_fail(f"chattr +i fails on this filesystem ({flagged.stderr.strip()})")
    try:
        result = world.run("sweep", "--json")
        assert result.returncode == 1, result.stderr[-2000:]  # a sweep with failed deletes exits 1
        counts = json.loads(result.stdout)
        assert (counts["failed"], counts["deleted"]) == (len(locked), len(world.record.doomed) - len(locked)), counts
        with world.db.transaction() as session:
            rows = session.execute(select(MediaItem.id, MediaItem.state, MediaItem.last_error, MediaItem.attempts)
                                   .where(MediaItem.id.in_(locked))).all()
        assert {(row.state, row.attempts) for row in rows} == {(State.DELETING.value, 1)}
        assert all("not permitted" in row.last_error.lower() for row in rows), rows[0].last_error
        assert all((world.media / world.record.keys[m]).exists() for m in locked)
        assert world.ok("sweep")["claimed"] == 0  # still inside the backoff
    finally:
        subprocess.run(["chattr", "-i", str(shard)], check=True)
    world.end_leases()
    assert world.ok("sweep")["deleted"] == len(locked)
    lost, early = world.check_record()
    world.verify_clean()
    record("EPERM on one shard directory during a sweep", "chattr +i on the directory (blocks root too)", 1, lost, early,
           f"{len(locked)} items kept `deleting` with last_error + backoff, rest deleted; after clearing, deleted; verify clean")
