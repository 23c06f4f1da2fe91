"""Servers restarted under a running sweep: a private PostgreSQL cluster (never the shared one) and a
private Redis under a Celery fleet."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.faults.conftest import World, record, skip_or_fail
from tests.conftest import free_port
from worker import schema
from worker.db import Database
from worker.models import State

pytestmark = pytest.mark.slow

PG_BIN = Path(os.environ.get("MEDIA_RETENTION_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PrivatePostgres:
    """A throwaway cluster in a temp dir on a free port, run as `postgres` (the server refuses root)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mr-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        shutil.chown(self.dir, "postgres", "postgres")

    def _as_postgres(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, check=check, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", *args)

    def start(self) -> None:
        self.pg_ctl("start")

    def restart(self) -> None:
        self.pg_ctl("-m", "fast", "restart")

    def destroy(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres():
    if not (PG_BIN / "initdb").exists() or not shutil.which("runuser"):
        skip_or_fail(f"PostgreSQL binaries ({PG_BIN}/initdb) or runuser are missing, so no private cluster can be restarted")
    server = PrivatePostgres()
    try:
        server.init()
    except (subprocess.CalledProcessError, KeyError, LookupError) as exc:
        server.destroy()
        skip_or_fail(f"a private PostgreSQL cluster cannot be started here ({exc})")
    yield server
    server.destroy()


def test_postgresql_restarted_mid_sweep_loses_nothing_and_the_next_sweep_completes(tmp_path, private_postgres, rng):
    """`pg_ctl -m fast restart` while a sweep of one item a batch runs: that sweep fails or recovers,
    the next one completes, nothing early or lost, verify clean."""
    db = Database(private_postgres.url)
    schema.upgrade(db)
    try:
        world = World(tmp_path, db, sweep_batch_size="1", claim_lease="1h")
        world.seed("pg", expired=400, unexpired=100, held=50)
        sweep = world.start("sweep", "--json")
        while not any(state != State.ACTIVE.value for state in world.states().values()):
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        private_postgres.restart()
        db.engine.dispose()
        out, err = sweep.communicate(timeout=120)
        outcome = "recovered" if sweep.returncode == 0 else "failed"
        if sweep.returncode != 0:
            assert len(err.strip().splitlines()[-1:]) == 1 and "database" in err.lower(), err[-2000:]
        world.end_leases()
        assert world.ok("sweep")["failed"] == 0
        lost, early = world.check_record()
        world.verify_clean()
    finally:
        db.dispose()
    record("PostgreSQL restarted mid-sweep", "private cluster, `pg_ctl -m fast restart` during a 1-item-a-batch sweep",
           1, lost, early, f"that sweep {outcome}; the next one completed; verify clean")


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_redis_restarted_mid_drain_leaves_every_expired_item_deleted_and_nothing_early(fleet, database, media_root, private_redis):
    """Two Celery worker processes and beat drain 2,000 expired items among unexpired and held ones;
    Redis is killed mid-drain and started 2 s later: every expired unheld item ends deleted, nothing
    early, verify clean."""
    from tests.fleet import all_swept, counts_by_state, wait_until

    world = World(media_root.parent, database)
    world.seed("fleet", expired=2000, unexpired=200, held=100)
    fleet.worker("w1")
    fleet.worker("w2")
    fleet.beat("beat")
    wait_until(lambda: counts_by_state(database).get(State.DELETED.value, 0) > 0, 60, "the drain to begin", interval=0.02)
    private_redis.stop()
    during = counts_by_state(database).get(State.DELETED.value, 0)
    time.sleep(2)
    private_redis.start()
    wait_until(all_swept(database, len(world.record.doomed)), 90, "the fleet to finish after Redis came back")
    fleet.stop_all()
    lost, early = world.check_record()
    world.verify_clean()
    print(f"redis restarted after {during} of {len(world.record.doomed)} deletions")
    record("Redis restarted mid-fleet", "private redis-server killed mid-drain (2 workers + beat), restarted 2 s later",
           1, lost, early, f"restarted after {during}/{len(world.record.doomed)} deletions; all expired deleted; verify clean")
