"""Migrations on a catalog that already holds data, on SQLite and PostgreSQL."""

from sqlalchemy import text

from worker import schema


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
