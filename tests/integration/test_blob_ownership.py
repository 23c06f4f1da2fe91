"""One owner for every blob: the catalog decides every blob write and delete at the moment of the act.

The races an outside audit found on SQLite and PostgreSQL, the filesystem and S3, each pinned down: two
registrations of one key (the loser deleted the winner's blob), reconcile interleaved with a registration
of an orphan's key (reconcile deleted a blob a registration had just claimed), and names the store keeps
for its own files (a registered blob named like a temporary file was deleted as an abandoned upload).
Each interleaving is forced at the step where the old code went wrong, so each test fails on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import literal, select

from config.errors import BadInput
from config.settings import load_settings
from tests.e2e.conftest import SCRIPT
from tests.factories import make_file, plant_blob, seed_items, wait_until_older
from tests.s3 import PREFIX
from worker import reservations
from worker.catalog.registration import Registration
from worker.db import plus_seconds
from worker.engine import build
from worker.models import KeyReservation, MediaItem
from worker.reconcile import Reconciler
from worker.store.fs import FilesystemStore
from worker.store.keys import key_for_id
from worker.verify import Verifier

GRACE = timedelta(seconds=1)


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


def verify(catalog):
    return Verifier(catalog.db, catalog.store).run(grace=timedelta(days=1), stuck_after=timedelta(days=1))


def catalog_keys(catalog) -> dict[str, str]:
    with catalog.db.transaction() as session:
        return dict(session.execute(select(MediaItem.id, MediaItem.storage_key)).all())


def reservation_count(catalog) -> int:
    with catalog.db.transaction() as session:
        return len(session.scalars(select(KeyReservation.storage_key)).all())


def interleave_before_insert(monkeypatch, catalog, other) -> list:
    """Run `other()` once, just before the first registration to reach step 3 (the insert) goes on: after it
    reserved its key and wrote or looked at its blob. Returns a list that gets what `other` returned."""
    real_insert, done = Registration._insert, []

    def insert(self, *args, **kwargs):
        if not done:
            done.append(None)
            done[0] = other()
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(Registration, "_insert", insert)
    return done


# -- two registrations of one key ------------------------------------------------------------------


def lose_the_race_for_an_id(catalog, tmp_path, monkeypatch) -> None:
    catalog.set_org("acme", "30d")
    upload = make_file(tmp_path / "up", b"the same photo")

    def second_registration():
        return catalog.register(org="acme", file=upload, media_id="photo-1", ttl="7d")

    won = interleave_before_insert(monkeypatch, catalog, second_registration)
    with pytest.raises(BadInput, match="already exists|registered concurrently|taken over by another registration"):
        catalog.register(org="acme", file=upload, media_id="photo-1", ttl="7d")
    assert won[0].id == "photo-1"
    assert catalog.store.digest(key_for_id("photo-1")).size == len(b"the same photo")
    assert catalog.lookup("photo-1").key == key_for_id("photo-1")
    report = verify(catalog)
    assert report.clean, report.to_dict()
    assert reservation_count(catalog) == 0


def test_a_registration_that_loses_the_race_for_its_id_deletes_nothing_the_winner_adopted(catalog, tmp_path, monkeypatch):
    """A copies the file in under its key; before A inserts its row, B registers the same ID and file, finds
    A's bytes at the key, adopts them and commits. A then fails (its key was taken over) and must leave the
    blob alone: it is B's item's now. On the old code A removed "the blob it wrote" and left B's item without one."""
    lose_the_race_for_an_id(catalog, tmp_path, monkeypatch)


def test_on_s3_a_registration_that_loses_the_race_for_its_id_deletes_nothing_the_winner_adopted(s3_catalog, tmp_path,
                                                                                                monkeypatch):
    """The same race on an object store: A's create-only PUT wrote the object, B adopted it, A deletes nothing."""
    lose_the_race_for_an_id(s3_catalog, tmp_path, monkeypatch)


@pytest.fixture
def pg_catalog(pg_database, tmp_path):
    """A catalog on PostgreSQL and a filesystem store, for races that need real row locks."""
    root = tmp_path / "media"
    root.mkdir()
    settings = load_settings(data_dir=tmp_path / "data", database_url=pg_database.url, storage_url=root.as_uri(),
                             sweep_batch_size=50, delete_threads=4)
    engine = build(settings, database=pg_database, store=FilesystemStore(root, delete_threads=4))
    yield engine.catalog
    engine.store.close()


def test_two_registrations_of_one_id_in_threads_leave_the_winners_blob_every_round(pg_catalog, tmp_path):
    """Two threads register the same ID and file at once, 60 rounds on PostgreSQL: each round exactly one
    wins and its item has its blob (the audit's count on the old code: 22 and 36 of 200 rounds lost it)."""
    catalog = pg_catalog
    catalog.set_org("acme", "30d")
    upload = make_file(tmp_path / "up", b"raced bytes")
    rounds, outcomes = 60, []
    for number in range(rounds):
        barrier, results = threading.Barrier(2), []

        def register(media_id=f"raced-{number}"):
            barrier.wait()
            try:
                results.append(catalog.register(org="acme", file=upload, media_id=media_id).id)
            except BadInput as exc:
                results.append(str(exc))

        threads = [threading.Thread(target=register) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        outcomes.append(sum(1 for result in results if result == f"raced-{number}"))
    assert outcomes == [1] * rounds
    missing = [media_id for media_id, key in catalog_keys(catalog).items() if not catalog.store.exists(key)]
    assert missing == []
    assert verify(catalog).clean


def manifest_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_two_overlapping_manifest_imports_of_the_same_files_leave_every_item_with_its_blob(pg_catalog, tmp_path):
    """The audit's case, as an operator runs it: two `media-retention register --manifest` processes at once
    importing the same 2,000 file lines (one batch each) in opposite order, on PostgreSQL. However they
    interleave, every item that committed has its blob, a process that lost says so in one sentence, and
    re-running it completes the import (its committed lines are skipped); verify is clean. The old code left
    669 to 1,017 of the 2,000 items without a blob in each of 5 runs (with 400 lines: 2 runs of 6)."""
    catalog = pg_catalog
    catalog.set_org("acme", "30d")
    rows = [{"org": "acme", "id": f"line-{n}", "file": str(make_file(tmp_path / "up", f"bytes {n}".encode())), "ttl": "7d"}
            for n in range(2000)]
    paths = [manifest_file(tmp_path / "forward.jsonl", rows), manifest_file(tmp_path / "backward.jsonl", rows[::-1])]
    env = {**os.environ, "MEDIA_RETENTION_DATABASE_URL": catalog.db.url, "MEDIA_RETENTION_DATA_DIR": str(tmp_path / "data"),
           "MEDIA_RETENTION_STORAGE_URL": catalog.store.url, "MEDIA_RETENTION_LOG_LEVEL": "WARNING"}
    processes = [subprocess.Popen([str(SCRIPT), "register", "--manifest", str(path), "--files-root", str(tmp_path / "up"), "--json"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) for path in paths]
    outcomes = [(process.wait(120), *process.communicate()) for process in processes]
    raced = ("already exists; IDs are never reused", "taken over by another registration", "registered concurrently",
             "already belongs to another")
    for (code, _out, err), path in zip(outcomes, paths, strict=True):
        if code != 0:
            assert code in (1, 2) and any(sentence in err for sentence in raced), err
            catalog.register_manifest(path, files_root=tmp_path / "up")
    assert any(code == 0 for code, _out, _err in outcomes)
    keys = catalog_keys(catalog)
    assert len(keys) == 2000
    assert [media_id for media_id, key in keys.items() if not catalog.store.exists(key)] == []
    assert verify(catalog).clean
    assert reservation_count(catalog) == 0


def test_a_failed_batch_removes_the_blobs_it_wrote_under_keys_it_still_holds(catalog, acme, tmp_path, monkeypatch):
    """The other side of the arbitration: a batch that fails on its own (here its insert) and was not raced
    still owns its keys, so it removes every blob it copied in and gives its reservations back."""
    uploads = [make_file(tmp_path / "up", f"mine {n}".encode()) for n in range(3)]

    def failing_insert(self, *args, **kwargs):
        raise BadInput("refused by the test")

    monkeypatch.setattr(Registration, "_insert", failing_insert)
    batch = [catalog.registration.validate_new(org=acme, file=path, key=None, media_id=f"own-{n}", ttl=None,
                                               created_at=None, mime=None, now=catalog.registration.database_now())
             for n, path in enumerate(uploads)]
    with pytest.raises(BadInput, match="refused by the test"):
        catalog.registration.write_batch(batch)
    assert [catalog.store.exists(key_for_id(f"own-{n}")) for n in range(3)] == [False] * 3
    assert reservation_count(catalog) == 0


# -- reconcile and a registration of an orphan's key -------------------------------------------------


def test_reconcile_leaves_an_orphans_blob_to_a_registration_that_holds_its_key(catalog, acme, media_root, monkeypatch):
    """`register --key` of an old unregistered blob has reserved the key and seen the blob; reconcile runs
    (grace 1 s) before the registration inserts its row. Reconcile finds the key held and keeps the blob;
    the item is registered with it. On the old code reconcile deleted it and the item had no blob."""
    blob = plant_blob(media_root, "legacy/2019/a.jpg", b"old media")
    wait_until_older([blob], GRACE)
    seed_items(catalog.db, media_root, acme, 3, prefix="bystander")  # so the drift is not "every blob"
    reports = interleave_before_insert(monkeypatch, catalog, lambda: Reconciler(catalog.db, catalog.store).run(grace=GRACE))
    item = catalog.register(org=acme, key="legacy/2019/a.jpg", media_id="legacy-a")
    assert reports[0].orphans_deleted == 0 and reports[0].reserved_skipped == 1
    assert blob.exists() and catalog.lookup(item.id).key == "legacy/2019/a.jpg"
    assert verify(catalog).clean


def test_a_registration_of_a_key_reconcile_is_deleting_waits_and_then_finds_no_blob(catalog, acme, media_root, monkeypatch):
    """Reconcile has taken an orphan's key and is deleting its blob when `register --key` of it starts (another
    thread). The registration waits for reconcile's transaction, then finds the blob gone and says so: no
    item without a blob. On the old code the registration committed while reconcile deleted."""
    blob = plant_blob(media_root, "legacy/2019/b.jpg", b"old media")
    wait_until_older([blob], GRACE)
    seed_items(catalog.db, media_root, acme, 3, prefix="bystander")
    outcome: dict = {}
    store_delete = type(catalog.store).delete_many

    def register():
        try:
            outcome["item"] = catalog.register(org=acme, key="legacy/2019/b.jpg", media_id="legacy-b")
        except BadInput as exc:
            outcome["error"] = str(exc)

    def delete_many(store, keys):
        if "legacy/2019/b.jpg" in keys and "thread" not in outcome:
            outcome["thread"] = threading.Thread(target=register)
            outcome["thread"].start()
            outcome["thread"].join(2.0)  # the old code's registration finished here; the new one waits for us
        return store_delete(store, keys)

    monkeypatch.setattr(type(catalog.store), "delete_many", delete_many)
    report = Reconciler(catalog.db, catalog.store).run(grace=GRACE)
    outcome["thread"].join(60)
    assert report.orphans_deleted == 1 and not blob.exists()
    assert "item" not in outcome and "no blob at storage key 'legacy/2019/b.jpg'" in outcome["error"]
    assert "legacy-b" not in catalog_keys(catalog)
    assert verify(catalog).clean


def test_reconcile_takes_over_the_reservation_of_a_registration_that_died_and_removes_its_blob(
        catalog, acme, media_root, tmp_path, monkeypatch):
    """A registration killed after copying its file in leaves a reservation and a blob with no item. Once
    older than the grace, reconcile takes the key over and removes the blob and the reservation."""
    monkeypatch.setattr(reservations, "release", lambda *args: [])  # a killed process cleans nothing up

    def killed(self, *args, **kwargs):
        raise SystemExit("SIGKILL")

    monkeypatch.setattr(Registration, "_insert", killed)
    seed_items(catalog.db, media_root, acme, 3, prefix="bystander")
    with pytest.raises(SystemExit):
        catalog.register(org=acme, file=make_file(tmp_path / "up", b"half done"), media_id="died")
    monkeypatch.undo()
    left = media_root / key_for_id("died")
    assert left.exists() and reservation_count(catalog) == 1
    report = Reconciler(catalog.db, catalog.store).run(grace=timedelta(days=1))
    assert report.orphans_deleted == 0 and report.reserved_skipped == 1 and left.exists()
    wait_until_older([left], GRACE)
    with catalog.db.transaction() as session:
        session.execute(KeyReservation.__table__.update().values(reserved_at=plus_seconds(KeyReservation.reserved_at, literal(-3600))))
    report = Reconciler(catalog.db, catalog.store).run(grace=GRACE)
    assert report.orphans_deleted == 1 and not left.exists()
    assert reservation_count(catalog) == 0


def test_rerunning_a_registration_a_crash_cut_short_takes_over_its_reservation_and_adopts_its_blob(
        catalog, acme, media_root, tmp_path, monkeypatch):
    """The re-run of a killed `register --file` succeeds at once (it takes over the dead run's reservation
    and adopts the identical bytes it left): the operator's way out needs no wait and no reconcile."""
    upload = make_file(tmp_path / "up", b"try again")
    monkeypatch.setattr(reservations, "release", lambda *args: [])
    monkeypatch.setattr(Registration, "_insert", lambda self, *a, **k: (_ for _ in ()).throw(SystemExit("SIGKILL")))
    with pytest.raises(SystemExit):
        catalog.register(org=acme, file=upload, media_id="again")
    monkeypatch.undo()
    item = catalog.register(org=acme, file=upload, media_id="again")
    assert catalog.store.digest(item.key).size == len(b"try again")
    assert reservation_count(catalog) == 0 and verify(catalog).clean


# -- names the store keeps for itself --------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"media_id": ".incoming-00ff00ff"},
    {"key": "ab/cd/.incoming-0123456789abcdef"},
    {"key": ".incoming-x/photo.jpg"},
    {"key": ".media-retention.json"},
    {"key": ".media-retention/other"},
], ids=["id-like-a-temp-file", "key-like-a-temp-file", "temp-step-inside-a-key", "the-marker", "beside-the-marker"])
def test_ids_and_keys_cannot_take_the_names_the_store_keeps_for_its_own_files(catalog, acme, media_root, tmp_path, options):
    """A registration whose ID or key takes one of the store's reserved forms is refused in one sentence and
    changes nothing."""
    if "key" in options:
        plant_blob(media_root, options["key"], b"bytes")
        arguments = {"key": options["key"]}
    else:
        arguments = {"file": make_file(tmp_path / "up"), "media_id": options["media_id"]}
    with pytest.raises(BadInput, match="reserved"):
        catalog.register(org=acme, **arguments)
    assert catalog_keys(catalog) == {} and reservation_count(catalog) == 0


def test_a_held_item_registered_under_a_temporary_looking_name_before_the_rule_is_never_deleted_by_reconcile(
        catalog, acme, media_root):
    """Items registered before such names were refused (planted here straight into the catalog): one named
    like our temporary files exactly, one only like their prefix; both held. Reconcile, a day's grace or a
    second's, asks the catalog before it discards anything and keeps both; verify finds nothing wrong."""
    keys = {"legacy-temp": "ab/cd/.incoming-0123456789abcdef", "legacy-prefix": "ab/cd/.incoming-00ff00ff"}
    ids = seed_items(catalog.db, media_root, acme, keys=keys, expired=False, held=True)
    wait_until_older([media_root / key for key in keys.values()], GRACE)
    seed_items(catalog.db, media_root, acme, 3, prefix="bystander", expired=False)
    report = Reconciler(catalog.db, catalog.store).run(grace=GRACE)
    assert report.partial_uploads_discarded == 0 and report.orphans_deleted == 0
    assert all((media_root / key).exists() for key in keys.values())
    assert set(ids) <= set(catalog_keys(catalog))
    found = verify(catalog)
    assert found.breaches["missing_blob"] == 0 and found.breaches["orphan_blob"] == 0


def test_only_a_file_named_exactly_as_the_store_names_its_temporary_files_is_a_partial_upload(catalog, acme, media_root):
    """`.incoming-` and 16 lowercase hex digits is ours by construction; anything else, however alike, is a
    blob like any other (an orphan here, once old)."""
    ours = plant_blob(media_root, "ab/cd/.incoming-0123456789abcdef", b"half")
    alike = plant_blob(media_root, "ab/cd/.incoming-00ff00ff", b"someone's")
    listed = {entry.key: type(entry).__name__ for entry in catalog.store.iter_keys(partial_uploads=True)}
    assert listed == {"ab/cd/.incoming-0123456789abcdef": "PartialUpload", "ab/cd/.incoming-00ff00ff": "BlobInfo"}
    assert [entry.key for entry in catalog.store.iter_keys()] == ["ab/cd/.incoming-00ff00ff"]
    assert ours.exists() and alike.exists()


def test_on_s3_reconcile_leaves_an_orphans_object_to_a_registration_that_holds_its_key(s3_catalog, objects, bucket, monkeypatch):
    """The same interleaving on an object store: an old object no item names, `register --key` of it has
    reserved the key and seen the object when reconcile runs; reconcile keeps it and the item has it."""
    s3_catalog.set_org("acme", "30d")
    objects.put(bucket, [f"{PREFIX}/legacy/2019/a.jpg"], body=b"old media", age=timedelta(days=3))
    seed_items(s3_catalog.db, objects.writer(bucket), "acme", 3, prefix="bystander")
    reports = interleave_before_insert(monkeypatch, s3_catalog,
                                       lambda: Reconciler(s3_catalog.db, s3_catalog.store).run(grace=timedelta(days=1)))
    item = s3_catalog.register(org="acme", key="legacy/2019/a.jpg", media_id="legacy-a")
    assert reports[0].orphans_deleted == 0 and reports[0].reserved_skipped == 1
    assert f"{PREFIX}/legacy/2019/a.jpg" in objects.names(bucket) and s3_catalog.lookup(item.id).key == "legacy/2019/a.jpg"
    assert verify(s3_catalog).clean
