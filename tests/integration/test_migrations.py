"""Migrations on a catalog that already holds data, on SQLite and PostgreSQL; concurrent upgrades on PostgreSQL."""

import json
import os
import secrets
import subprocess
import threading

import pytest
from sqlalchemy import text

from tests.conftest import _schema_url
from tests.e2e.conftest import SCRIPT
from tests.fleet import wait_until
from worker import schema
from worker.db import Database


def test_hold_flag_migration_backfills_items_of_held_orgs(database):
    """Upgrading a 0003 catalog marks exactly the active items of held orgs as org_held."""
    assert schema.downgrade(database, "0003") == "0003"
    with database.transaction() as session:
        session.execute(text("INSERT INTO organizations (id, retention_seconds, held_at) "
                             "VALUES ('held', 3600, CURRENT_TIMESTAMP), ('free', 3600, NULL)"))
        for number, (org, state) in enumerate([("held", "active"), ("held", "deleted"), ("free", "active")]):
            session.execute(text("INSERT INTO media_items (id, org_id, storage_key, size_bytes, mime_type, created_at, expires_at, state) "
                                 "VALUES (:id, :org, :key, 1, 'x/y', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :state)"),
                            {"id": f"m{number}", "org": org, "key": f"k{number}", "state": state})
    assert schema.upgrade(database) == schema.head_revision()
    with database.transaction() as session:
        flags = {row.id: bool(row.org_held) for row in session.execute(text("SELECT id, org_held FROM media_items"))}
    assert flags == {"m0": True, "m1": False, "m2": False}


def test_every_migration_downgrades_to_an_empty_catalog_and_upgrades_again(database):
    """The whole chain runs down to base and back up to head."""
    assert schema.downgrade(database, "base") is None
    assert schema.upgrade(database) == schema.head_revision()


@pytest.fixture
def empty_pg_schema(pg_server_url: str):
    """The URL of a new, empty PostgreSQL schema (no tables yet), dropped afterwards."""
    name = f"t_{secrets.token_hex(6)}"
    admin = Database(pg_server_url)
    with admin.engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield _schema_url(pg_server_url, name)
    finally:
        with admin.engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


def test_concurrent_db_upgrades_on_a_fresh_schema_all_succeed(empty_pg_schema, tmp_path):
    """Six `media-retention db upgrade` processes started together (a release's init containers) all exit 0 at head."""
    env = {**os.environ, "MEDIA_RETENTION_DATABASE_URL": empty_pg_schema, "MEDIA_RETENTION_DATA_DIR": str(tmp_path)}
    processes = [subprocess.Popen([str(SCRIPT), "db", "upgrade", "--json"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(6)]
    outcomes = [(process.wait(timeout=120), *process.communicate()) for process in processes]
    assert [code for code, _, _ in outcomes] == [0] * 6, [err for _, _, err in outcomes]
    assert {json.loads(out)["to"] for _, out, _ in outcomes} == {schema.head_revision()}
    db = Database(empty_pg_schema)
    try:
        with db.transaction() as session:
            assert session.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [schema.head_revision()]
    finally:
        db.dispose()


def test_of_three_concurrent_db_upgrades_one_reports_migrating_the_fresh_schema_and_two_the_revision_they_found(
        empty_pg_schema, tmp_path):
    """Three `db upgrade` processes queue on the migration lock of a fresh schema: one reports `from: null`, the
    two that waited report `from: <head>` (what they found once the lock was theirs), all `to: <head>`."""
    env = {**os.environ, "MEDIA_RETENTION_DATABASE_URL": empty_pg_schema, "MEDIA_RETENTION_DATA_DIR": str(tmp_path)}
    holder = Database(empty_pg_schema)
    try:
        with holder.engine.connect() as held:
            held.execute(text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"),
                         {"key": schema.MIGRATION_LOCK_KEY})
            processes = [subprocess.Popen([str(SCRIPT), "db", "upgrade", "--json"], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(3)]
            # All three have looked at the fresh schema and wait for the lock: their starts truly overlap.
            wait_until(lambda: _lock_waiters(held) == 3, 60, "three upgrades to queue for the migration lock")
            held.rollback()
        outcomes = [(process.wait(timeout=120), *process.communicate()) for process in processes]
    finally:
        holder.dispose()
    assert [code for code, _, _ in outcomes] == [0] * 3, [err for _, _, err in outcomes]
    reports = [json.loads(out) for _, out, _ in outcomes]
    head = schema.head_revision()
    assert sorted([report["from"] for report in reports], key=str) == sorted([None, head, head], key=str)
    assert [report["to"] for report in reports] == [head] * 3


def test_an_upgrade_waits_while_another_migration_of_the_schema_holds_the_lock(empty_pg_schema):
    """While another session holds the schema's migration lock, an upgrade creates nothing; it migrates once released."""
    holder, db = Database(empty_pg_schema), Database(empty_pg_schema)
    outcome: dict = {}
    try:
        with holder.engine.connect() as held:
            held.execute(text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"),
                         {"key": schema.MIGRATION_LOCK_KEY})
            upgrader = threading.Thread(target=lambda: outcome.setdefault("revision", schema.upgrade(db)))
            upgrader.start()
            wait_until(lambda: _lock_waiters(held) == 1, 30, "the upgrade to queue for the migration lock")
            assert upgrader.is_alive() and schema.current_revision(holder) is None
            held.rollback()
        upgrader.join(60)
        assert outcome == {"revision": schema.head_revision()}
    finally:
        holder.dispose()
        db.dispose()


def _lock_waiters(connection) -> int:
    return connection.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                   "AND classid = :key AND objid = hashtext(current_schema())::oid"),
                              {"key": schema.MIGRATION_LOCK_KEY}).scalar()
