"""Migrations on a catalog that already holds data, on SQLite and PostgreSQL; concurrent upgrades on PostgreSQL."""

import json
import os
import secrets
import subprocess
import threading

import pytest
from sqlalchemy import make_url, text

from config.errors import RetentionError
from tests.conftest import _schema_url, free_port
from tests.e2e.conftest import SCRIPT
from tests.fleet import wait_until
from tests.tools import require_tool
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


def org_indexes(database) -> dict[str, bool]:
    """The org indexes of media_items on the catalog: name -> whether it is partial (has a WHERE)."""
    with database.transaction() as session:
        if database.engine.dialect.name == "postgresql":
            rows = session.execute(text("SELECT indexname, indexdef LIKE '%WHERE%' FROM pg_indexes WHERE tablename = 'media_items' "
                                        "AND schemaname = current_schema() AND indexname LIKE '%org_id%'")).all()
        else:
            rows = session.execute(text("SELECT name, sql LIKE '%WHERE%' FROM sqlite_master WHERE type = 'index' "
                                        "AND tbl_name = 'media_items' AND name LIKE '%org_id%'")).all()
    return {name: bool(partial) for name, partial in rows}


def test_migration_0014_swaps_the_org_index_for_one_on_live_rows_and_its_downgrade_swaps_back(database):
    """At 0011 the org index covers every row; 0014 replaces it with the partial one on live rows, keeping the
    catalog's rows; downgrading to 0011 restores the old one, and upgrading again the new."""
    assert schema.downgrade(database, "0011") == "0011"
    assert org_indexes(database) == {"ix_media_items_org_id_state": False}
    with database.transaction() as session:
        session.execute(text("INSERT INTO organizations (id, retention_seconds) VALUES ('acme', 3600)"))
        for number, state in enumerate(["active", "deleting", "deleted"]):
            session.execute(text("INSERT INTO media_items (id, org_id, storage_key, size_bytes, mime_type, created_at, expires_at, state) "
                                 "VALUES (:id, 'acme', :key, 1, 'x/y', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :state)"),
                            {"id": f"m{number}", "key": f"k{number}", "state": state})
    assert schema.upgrade(database, "0014") == "0014"
    assert org_indexes(database) == {"ix_media_items_live_org_id_state": True}
    with database.transaction() as session:
        assert session.scalar(text("SELECT count(*) FROM media_items")) == 3
    assert schema.downgrade(database, "0011") == "0011"
    assert org_indexes(database) == {"ix_media_items_org_id_state": False}
    assert schema.upgrade(database) == schema.head_revision()
    assert org_indexes(database) == {"ix_media_items_live_org_id_state": True}


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_migration_0014_keeps_a_live_org_index_built_beforehand_and_refuses_one_built_otherwise(database):
    """An org index of the new name built by hand on other columns makes 0014 abort with the catalog left at 0011
    and its old index in place; built concurrently beforehand as the migration says, 0014 keeps it."""
    assert schema.downgrade(database, "0011") == "0011"
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("CREATE INDEX ix_media_items_live_org_id_state ON media_items (org_id)"))
    with pytest.raises(RetentionError, match="ix_media_items_live_org_id_state already exists and is not on"):
        schema.upgrade(database)
    assert schema.current_revision(database) == "0011"
    assert org_indexes(database) == {"ix_media_items_org_id_state": False, "ix_media_items_live_org_id_state": False}
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("DROP INDEX ix_media_items_live_org_id_state"))
        connection.execute(text("CREATE INDEX CONCURRENTLY ix_media_items_live_org_id_state ON media_items (org_id, state) "
                                "WHERE state <> 'deleted'"))
    assert schema.upgrade(database) == schema.head_revision()
    assert org_indexes(database) == {"ix_media_items_live_org_id_state": True}


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


def _through_port(url: str, port: int, password: str) -> str:
    """`url` with another port and a password (PostgreSQL here trusts, so it is ignored but must stay secret)."""
    return make_url(url).set(port=port, password=password).render_as_string(hide_password=False)


def test_db_upgrade_wait_retries_until_the_database_answers_then_migrates(empty_pg_schema, tmp_path):
    """`db upgrade --wait` (the systemd migrate unit's command) against a port nothing listens on logs
    `db.unreachable` every 5 s, password masked, and keeps going; once the port leads to PostgreSQL
    (socat started late), it migrates to head and exits 0. Without --wait the same command fails at once."""
    socat = require_tool("socat")
    port = free_port()
    password = "s3cret-" + secrets.token_hex(4)
    env = {**os.environ, "MEDIA_RETENTION_DATABASE_URL": _through_port(empty_pg_schema, port, password),
           "MEDIA_RETENTION_DATA_DIR": str(tmp_path), "MEDIA_RETENTION_LOG_FORMAT": "json"}
    impatient = subprocess.run([str(SCRIPT), "db", "upgrade"], check=False, env=env, capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
    assert impatient.returncode == 1 and password not in impatient.stdout + impatient.stderr, impatient.stderr

    output = tmp_path / "upgrade.log"
    with output.open("wb") as log:
        waiting = subprocess.Popen([str(SCRIPT), "db", "upgrade", "--wait", "--json"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    target = make_url(empty_pg_schema)
    relay = None
    try:
        wait_until(lambda: output.read_text().count("db.unreachable") >= 2, 30, "two attempts on the closed port")
        assert waiting.poll() is None, output.read_text()
        relay = subprocess.Popen([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                  f"TCP:{target.host or '127.0.0.1'}:{target.port or 5432}"], stdin=subprocess.DEVNULL)
        assert waiting.wait(timeout=60) == 0, output.read_text()
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        if relay:
            relay.terminate()
            relay.wait()
    text_out = output.read_text()
    events = [json.loads(line) for line in text_out.splitlines() if line.startswith('{"')]
    unreachable = [event for event in events if event.get("event") == "db.unreachable"]
    assert [event["attempt"] for event in unreachable][:2] == [1, 2] and unreachable[0]["retry_in_s"] == 5.0
    assert password not in text_out
    assert json.loads(text_out.splitlines()[-1])["to"] == schema.head_revision()
