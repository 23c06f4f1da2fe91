"""A catalog acts only on its own store: the audit's misconfigurations, as an operator types the commands.

An unset MEDIA_RETENTION_DATABASE_URL (a new, empty SQLite catalog facing a full store), a bucket prefix left
out, a volume that is not mounted, a store whose every blob is gone: each destructive command refuses in one
sentence with exit 2 and changes nothing, on the filesystem and on S3, whichever database holds the real
catalog. Where the binding is right but the drift is of nearly everything, reconcile refuses too, unless
the operator says it is real (`--allow-mass-drift`).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta

import pytest

from config.errors import MediaRootMissing
from config.settings import get_settings
from tests.factories import make_file, plant_blob, seed_items, wait_until_older
from tests.s3 import PREFIX
from worker.binding import Unbound
from worker.catalog.registration import Registration
from worker.reconcile import Reconciler, TooMany
from worker.store import MARKER_NAME
from worker.store.fs import FilesystemStore

GRACE = timedelta(seconds=1)


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


def media_files(root) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def environment(monkeypatch, **values) -> None:
    """The operator's environment for the next `media-retention` commands (settings are read once, per test)."""
    for name, value in values.items():
        monkeypatch.setenv(f"MEDIA_RETENTION_{name.upper()}", str(value))
    get_settings.cache_clear()


# -- the wrong catalog ----------------------------------------------------------------------------


def test_with_the_database_url_unset_a_new_catalog_refuses_to_touch_a_bound_filesystem_store(catalog, acme, media_root, cli,
                                                                                            monkeypatch):
    """The audit's case on a volume: DATABASE_URL not exported, so a new embedded SQLite catalog faces the real,
    bound media root. reconcile (dry run, real, even allowing mass drift), purge, sweep and verify each refuse in
    one sentence with exit 2; every blob is still there."""
    seed_items(catalog.db, media_root, acme, 30, expired=False)
    before = media_files(media_root)
    environment(monkeypatch, storage_url=media_root.as_uri())
    for command in (["reconcile", "--grace", "1s", "--dry-run"], ["reconcile", "--grace", "1s"],
                    ["reconcile", "--grace", "1s", "--allow-mass-drift"], ["sweep"], ["verify"],
                    ["purge", "--org", "acme", "--yes"]):
        result = cli(*command)
        if command[0] == "purge":  # the new catalog does not know the org, and says so first
            assert result.code == 3, (command, result.stderr)
            continue
        # A warning that this catalog is new (DATABASE_URL unset) may come first; the refusal is one sentence.
        assert result.code == 2, (command, result.stderr)
        assert "belongs to another catalog" in result.stderr.splitlines()[-1], result.stderr
    assert media_files(media_root) == before


def test_with_the_database_url_unset_a_new_catalog_refuses_to_touch_a_bound_bucket(s3_catalog, objects, bucket, s3_endpoint,
                                                                                 cli, monkeypatch):
    """The same on S3 (the audit: 600 live objects deleted, exit 0): reconcile refuses, exit 2, nothing deleted."""
    s3_catalog.set_org("acme", "30d")
    seed_items(s3_catalog.db, objects.writer(bucket), "acme", 40, expired=False)
    before = objects.names(bucket)
    environment(monkeypatch, storage_url=f"s3://{bucket}/{PREFIX}", s3_endpoint_url=s3_endpoint, s3_addressing_style="path")
    for command in (["reconcile", "--grace", "1s"], ["reconcile", "--grace", "1s", "--allow-mass-drift", "--dry-run"]):
        result = cli(*command)
        assert result.code == 2 and "belongs to another catalog" in result.stderr, result.stderr
    assert objects.names(bucket) == before and len(before) == 40


def test_a_bucket_prefix_left_out_is_not_the_store_and_reconcile_deletes_nothing(s3_catalog, objects, bucket, s3_endpoint, cli,
                                                                              monkeypatch):
    """The catalog's store is s3://bucket/media; reconcile run against s3://bucket (the prefix left out) finds
    no marker there and refuses: no object of the prefix, and none beside it, is deleted."""
    s3_catalog.set_org("acme", "30d")
    seed_items(s3_catalog.db, objects.writer(bucket), "acme", 20, expired=False)
    objects.put(bucket, ["beside/old"], age=timedelta(days=3))
    before = objects.names(bucket)
    environment(monkeypatch, database_url=s3_catalog.db.url, storage_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint,
                s3_addressing_style="path")
    result = cli("reconcile", "--grace", "1s", "--allow-mass-drift")
    assert result.code == 2 and "carries no binding marker" in result.stderr, result.stderr
    assert objects.names(bucket) == before


def test_an_unmarked_store_full_of_blobs_is_never_bound_to_an_empty_catalog(media_root, cli, monkeypatch):
    """A store from before markers existed, facing an empty catalog: `db upgrade` says it will not bind it and
    why (exit 0: the schema is migrated), and reconcile then refuses; nothing is deleted."""
    wait_until_older([plant_blob(media_root, f"legacy/{number}.jpg") for number in range(5)], GRACE)
    environment(monkeypatch, storage_url=media_root.as_uri())
    upgraded = cli("db", "upgrade", "--json")
    assert upgraded.code == 0 and json.loads(upgraded.stdout)["store"]["bound"] is False
    assert "wrong database" in upgraded.stderr
    refused = cli("reconcile", "--grace", "1s", "--allow-mass-drift")
    assert refused.code == 2 and "carries no binding marker" in refused.stderr
    assert media_files(media_root) == {f"legacy/{number}.jpg" for number in range(5)}


def test_db_upgrade_binds_the_store_of_a_deployment_from_before_markers(catalog, acme, media_root, cli, monkeypatch):
    """An existing deployment upgraded: its catalog's live items have their blobs in the store, so `db upgrade`
    writes the marker, and reconcile then runs."""
    seed_items(catalog.db, media_root, acme, 5, expired=False)
    (media_root / MARKER_NAME).unlink()
    with catalog.db.transaction() as session:
        from sqlalchemy import update

        from worker.models import CatalogIdentity
        session.execute(update(CatalogIdentity).values(bound_at=None, store_url=None))
    environment(monkeypatch, database_url=catalog.db.url, storage_url=media_root.as_uri())
    upgraded = cli("db", "upgrade", "--json")
    assert upgraded.code == 0 and json.loads(upgraded.stdout)["store"]["bound"] is True, upgraded.stderr
    assert (media_root / MARKER_NAME).exists()
    assert cli("reconcile", "--grace", "1s").code == 0


# -- an unmounted volume --------------------------------------------------------------------------


def test_a_missing_media_root_is_an_error_never_created(catalog, acme, media_root, tmp_path, cli, monkeypatch):
    """The media root is not there (its volume not mounted, its parent neither): `register` refuses in one
    sentence, exit 2, and nothing creates the directory."""
    environment(monkeypatch, database_url=catalog.db.url, storage_url=(tmp_path / "mnt" / "media").as_uri())
    result = cli("register", "--org", "acme", "--file", str(make_file(tmp_path / "up")), "--id", "lost-1")
    assert result.code == 2 and "does not exist: is its volume mounted" in result.stderr, result.stderr
    assert not (tmp_path / "mnt").exists()
    store = FilesystemStore(tmp_path / "mnt" / "media")
    with pytest.raises(MediaRootMissing):
        list(store.iter_keys())
    assert not (tmp_path / "mnt").exists()


def test_on_an_unmounted_volume_registrations_and_deletions_refuse_and_nothing_is_written_beneath_it(
        catalog, acme, media_root, tmp_path, cli, monkeypatch):
    """The volume is not mounted, its mount point an empty directory: register, sweep, reconcile and purge each
    refuse in one sentence (exit 2); nothing is written beneath the mount point, and once the volume is back
    its media are all there and the same commands work."""
    seed_items(catalog.db, media_root, acme, 6, expired=True)
    away = tmp_path / "volume"
    media_root.rename(away)
    media_root.mkdir()
    environment(monkeypatch, database_url=catalog.db.url, storage_url=media_root.as_uri())
    for command in (["register", "--org", "acme", "--file", str(make_file(tmp_path / "up")), "--id", "new-1"],
                    ["sweep"], ["reconcile", "--grace", "1s"], ["purge", "--org", "acme", "--yes"]):
        result = cli(*command)
        assert result.code == 2 and "is its volume mounted" in result.stderr, (command, result.stderr)
    assert list(media_root.iterdir()) == []
    media_root.rmdir()
    away.rename(media_root)
    assert json.loads(cli("sweep", "--json").stdout)["deleted"] == 6


def test_a_volume_unmounted_under_a_running_process_stops_its_registrations_at_once(catalog, acme, media_root, tmp_path):
    """The engine was built and the store verified while mounted; then the volume goes away. The next
    registration finds no marker (a filesystem's is read at every check) and refuses: no blob beneath it."""
    catalog.register(org=acme, file=make_file(tmp_path / "up"), media_id="before")
    away = tmp_path / "volume"
    media_root.rename(away)
    media_root.mkdir()
    with pytest.raises(Unbound, match="is its volume mounted"):
        catalog.register(org=acme, file=make_file(tmp_path / "up"), media_id="during")
    assert list(media_root.iterdir()) == []


# -- drift of nearly everything, with the right binding -------------------------------------------


def test_reconcile_refuses_when_every_items_blob_is_gone_and_the_dry_run_says_why(catalog, acme, media_root, cli, monkeypatch):
    """`rm -rf` of the media (the marker left): every active item misses its blob. reconcile refuses (exit 2)
    and tombstones nothing; its dry run exits 0 saying a real run would refuse; `--allow-mass-drift` proceeds."""
    ids = seed_items(catalog.db, media_root, acme, 12, expired=True)
    for child in media_root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
    environment(monkeypatch, database_url=catalog.db.url, storage_url=media_root.as_uri())
    dry = cli("reconcile", "--grace", "1s", "--dry-run", "--json")
    assert dry.code == 0 and "12 of the 12 active items have no blob" in json.loads(dry.stdout)["refused"]
    assert "a real run would refuse" in dry.stderr
    refused = cli("reconcile", "--grace", "1s")
    assert refused.code == 2 and "12 of the 12 active items have no blob" in refused.stderr
    assert all(catalog.find(media_id).state == "expired" for media_id in ids)  # still active rows, not tombstones
    allowed = cli("reconcile", "--grace", "1s", "--allow-mass-drift", "--json")
    assert allowed.code == 0 and json.loads(allowed.stdout)["marked_missing"] == 12


def test_reconcile_refuses_when_nearly_every_blob_is_an_orphan(catalog, acme, media_root):
    """One item's blob among 19 blobs no item names, all old: at least 90 % orphans is refused, nothing deleted."""
    seed_items(catalog.db, media_root, acme, 1, expired=False)
    orphans = [plant_blob(media_root, f"stray/{number}.jpg") for number in range(19)]
    wait_until_older(orphans, GRACE)
    with pytest.raises(TooMany, match="19 of the 20 blobs listed have no item"):
        Reconciler(catalog.db, catalog.store).run(grace=GRACE)
    assert all(path.exists() for path in orphans)
    assert Reconciler(catalog.db, catalog.store).run(grace=GRACE, allow_mass_drift=True).orphans_deleted == 19


# -- adopt racing a registration ---------------------------------------------------------------------


def test_adopt_racing_a_registration_of_one_of_its_keys_skips_that_key_and_carries_on(catalog, acme, media_root, monkeypatch):
    """`register --key` of a legacy blob holds its key when `adopt` reaches it: adopt leaves that key to the
    registration (counted as raced) and adopts the rest, instead of stopping on a duplicate key; the
    registration gets its item with its blob."""
    blobs = [plant_blob(media_root, f"legacy/{number}.jpg") for number in range(4)]
    for path in blobs:
        stamp = path.stat().st_mtime - 3 * 86400
        os.utime(path, (stamp, stamp))
    real_insert, reports = Registration._insert, []

    def adopt_meanwhile(self, *args, **kwargs):
        if not reports:
            reports.append(catalog.adopter().run(org=acme, grace=timedelta(minutes=10), actor="ops"))
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(Registration, "_insert", adopt_meanwhile)
    item = catalog.register(org=acme, key="legacy/0.jpg", media_id="registered")
    assert (reports[0].adopted, reports[0].raced) == (3, 1)
    assert catalog.lookup(item.id).key == "legacy/0.jpg"
    monkeypatch.undo()
    assert Reconciler(catalog.db, catalog.store).run(grace=GRACE, allow_mass_drift=True).orphans_deleted == 0
    assert all(path.exists() for path in blobs)
