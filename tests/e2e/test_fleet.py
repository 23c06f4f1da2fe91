"""A real fleet: `celery worker` and `celery beat` processes on PostgreSQL and a Redis server of the
test's own (so the test may restart it), deleting real files."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from tests.factories import seed_items
from tests.fleet import all_swept, counts_by_state, wait_until
from worker.exporter import FLEET_STATUS_METRICS, HEALTH_PROBE_PATH
from worker.store.keys import key_for_id
from worker.models import MediaItem, State, SweepRun

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow,
              pytest.mark.parametrize("database", ["postgresql"], indirect=True)]


def test_two_workers_and_beat_delete_thousands_once_each_and_spare_unexpired(fleet, catalog, database, media_root):
    """Two worker processes plus beat clear 3,000 expired items within a minute: every blob deleted exactly
    once, both workers took part (fan-out), unexpired items untouched, lookups answer 404."""
    catalog.set_org("acme", "30d")
    expired = seed_items(catalog.db, media_root, "acme", 3000, prefix="old")
    fresh = seed_items(catalog.db, media_root, "acme", 200, prefix="new", expired=False)
    fleet.worker("w1")
    fleet.worker("w2")
    fleet.beat("beat")
    wait_until(all_swept(database, 3000), 60, "the fleet to delete 3,000 items")
    deleted = fleet.deleted_keys()
    assert len(deleted) == 3000 and max(deleted.values()) == 1, "a blob was deleted twice"
    assert fleet.journals_with_work() >= 2, "the backlog was not shared between worker processes"
    assert counts_by_state(database)[State.ACTIVE.value] == 200
    assert sum(1 for _ in catalog.store.iter_keys()) == 200
    from config.errors import Gone

    with pytest.raises(Gone):
        catalog.lookup(expired[1234])
    assert catalog.lookup(fresh[0]).state == "active"
    with database.transaction() as session:
        assert session.scalar(select(func.max(SweepRun.fanout))) > 0


def test_worker_killed_mid_batch_has_its_claims_finished_by_another_after_the_lease(fleet, catalog, database, media_root):
    """SIGKILL a worker between deleting a batch's blobs and recording it: on SQLite (two-phase) the rows stay
    `deleting` (404) and, once the 3 s lease runs out, another worker finishes them; on PostgreSQL (one transaction
    a batch) the kill rolls the batch back, its rows stay active and expired (404) with their blobs gone, and
    another worker takes them at once. Nothing leaks, nothing is deleted twice."""
    catalog.set_org("acme", "30d")
    ids = seed_items(catalog.db, media_root, "acme", 600)
    fleet.env["MEDIA_RETENTION_CLAIM_LEASE"] = "3s"
    fleet.worker("doomed", extra_env={"FLEET_TEST_PAUSE_AFTER_DELETE": "3"})
    fleet.beat("beat")
    wait_until(lambda: any(fleet.journal.glob("*.paused")), 30, "the doomed worker to delete its first batch",
               interval=0.05)
    fleet.kill("doomed")
    if catalog.db.sql.postgresql:
        active = counts_by_state(database).get(State.ACTIVE.value, 0)
        stranded = sum(1 for media_id in ids if not (media_root / key_for_id(media_id)).exists()) - (600 - active)
    else:
        stranded = counts_by_state(database).get(State.DELETING.value, 0)
    assert stranded >= 100, "the kill should have left a half-done batch"
    fleet.worker("survivor")
    wait_until(all_swept(database, 600), 60, "the survivor to finish every item")
    assert not any(catalog.store.iter_keys()), "a blob leaked"
    deleted = fleet.deleted_keys()
    assert max(deleted.values()) == 1 and len(deleted) == 600


def test_fleet_reconnects_after_redis_restarts_and_keeps_sweeping(fleet, catalog, database, media_root, private_redis):
    """Kill Redis under a running worker and beat, start it again: the next sweeps delete new expired items."""
    catalog.set_org("acme", "30d")
    seed_items(catalog.db, media_root, "acme", 50, prefix="before")
    fleet.worker("w1")
    fleet.beat("beat")
    wait_until(all_swept(database, 50), 30, "the first sweeps")
    private_redis.stop()
    time.sleep(2)
    private_redis.start()
    seed_items(catalog.db, media_root, "acme", 50, prefix="after")
    wait_until(all_swept(database, 100), 60, "a sweep after Redis came back")
    assert fleet.processes["w1"].poll() is None and fleet.processes["beat"].poll() is None


def test_two_beats_cause_one_scheduled_sweep_per_slot_and_no_double_deletes(fleet, catalog, database, media_root):
    """With two beats sending every second, each schedule slot runs one sweep (the other message finds
    its slot taken), and every blob is still deleted exactly once."""
    catalog.set_org("acme", "30d")
    fleet.worker("w1", concurrency=2)
    fleet.beat("beat-a")
    fleet.beat("beat-b")
    for wave in range(4):
        seed_items(catalog.db, media_root, "acme", 200, prefix=f"wave{wave}")
        time.sleep(1.5)
    wait_until(all_swept(database, 800), 60, "every wave to be deleted")
    time.sleep(2)
    deleted = fleet.deleted_keys()
    assert len(deleted) == 800 and max(deleted.values()) == 1
    skipped = [e for e in fleet.log_events("w1") if e.get("event") == "sweep.slot_taken"]
    assert skipped, "the second beat's messages should have found their slot taken"
    with database.transaction() as session:
        slots = session.scalars(select(SweepRun.slot).where(SweepRun.kind == "scheduled")).all()
    assert len(slots) == len(set(slots))


def test_a_pickled_message_is_refused_by_the_worker(fleet, catalog, database, private_redis):
    """A task message serialized with pickle is rejected, never run: JSON is the only accepted content."""
    from celery import Celery

    fleet.worker("w1")
    wait_until(lambda: any(e.get("event", "").startswith("w1@") or "ready" in e.get("event", "") for e in fleet.log_events("w1")),
               30, "the worker to be ready")
    sender = Celery(broker=private_redis.url)
    sender.conf.accept_content = ["pickle", "json"]
    sender.send_task("media_retention.sweep", kwargs={"limit": 1}, serializer="pickle")
    wait_until(lambda: any("Refusing to deserialize" in e.get("event", "") or "untrusted content" in e.get("event", "")
                           for e in fleet.log_events("w1")), 20, "the worker to refuse the pickled message")
    with database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(SweepRun)) == 0, "the pickled task ran"


def test_metrics_endpoint_sums_counters_across_prefork_processes_and_reports_fleet_status(fleet, catalog, database, media_root):
    """A worker with two pool processes serves one /metrics: deletions counted in both children add up
    to the total, and the status gauges (backlog, last sweep) come from the catalog."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import free_port

    catalog.set_org("acme", "30d")
    seed_items(catalog.db, media_root, "acme", 1500)
    port = free_port()
    fleet.env["MEDIA_RETENTION_METRICS_PORT"] = str(port)
    fleet.worker("w1", concurrency=2)
    fleet.beat("beat")
    wait_until(all_swept(database, 1500), 60, "the sweep")
    assert fleet.journals_with_work() == 2, "both pool processes should have deleted some items"

    def scrape():
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    samples = wait_until(lambda: (m := scrape()).get(("media_retention_deleted_items_total", (("reason", "ttl"),))) == 1500 and m,
                         15, "the summed deletion counter")
    assert samples[("media_retention_freed_bytes_total", ())] == 1500 * 10
    assert samples[("media_retention_backlog_items", (("state", "due"),))] == 0
    assert samples[("media_retention_catalog_up", ())] == 1
    assert ("media_retention_last_sweep_finished_timestamp_seconds", ()) in samples
    assert {name for name, _ in samples} >= set(FLEET_STATUS_METRICS)

    # What the health probes ask for: one counter, summed from the pool's files, and no catalog query.
    probe = urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PROBE_PATH}", timeout=5)
    families = {family.name for family in text_string_to_metric_families(probe.read().decode())}
    assert probe.status == 200 and families == {"media_retention_freed_bytes"}


def test_the_expiry_watch_runs_once_per_node_and_deletes_items_within_two_seconds_of_expiry(fleet, catalog, database, media_root):
    """With the watch on (its default), a node with two pool processes runs one watch, and items falling due
    over several seconds are each deleted after their expiry and within 2 s of it, though beat sweeps
    only every minute."""
    from datetime import timedelta

    from tests.factories import db_time, make_file

    catalog.set_org("acme", "30d")
    fleet.env.update(MEDIA_RETENTION_WATCH_INTERVAL="1s", MEDIA_RETENTION_SWEEP_INTERVAL="60s")
    fleet.worker("w1", concurrency=2)
    wait_until(lambda: any(e.get("event") == "watch.started" for e in fleet.log_events("w1")), 30, "the watch to start")
    now = db_time(catalog)
    ids = []
    for n in range(6):
        created = now - timedelta(hours=1) + timedelta(seconds=2 + n)
        ids.append(catalog.register(org="acme", file=make_file(media_root.parent / "uploads"), media_id=f"due-{n}",
                                    ttl="1h", created_at=created).id)
    wait_until(lambda: counts_by_state(database).get(State.DELETED.value) == 6, 30, "the watch to delete six items")
    with database.transaction() as session:
        rows = session.execute(select(MediaItem.id, MediaItem.expires_at, MediaItem.deleted_at)).all()
    lateness = {row.id: (row.deleted_at - row.expires_at).total_seconds() for row in rows}
    assert all(0 <= late <= 2 for late in lateness.values()), lateness
    starts = [e for e in fleet.log_events("w1") if e.get("event") == "watch.started"]
    assert len(starts) == 1, "one watch per node, in its first pool process"
