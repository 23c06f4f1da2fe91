"""Create or migrate the schema with Alembic, from code (the CLI, `run`, and the tests).

Every pod of a release may run `media-retention db upgrade` at once (an init container per pod), so
on PostgreSQL an upgrade first takes a transaction-level advisory lock: the first one migrates, the
others wait for its commit, then find the schema at head and change nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

from worker.db import Database

if TYPE_CHECKING:
    from alembic.config import Config

# The newest migration's revision. Every command checks the catalog against it before it starts, and
# reading it from here spares each of them loading Alembic and every migration script (a tenth of a
# second of a short command). A unit test holds it to Alembic's own head.
HEAD = "0014"

# First key of the advisory lock: a constant naming this application ("mr"), so its lock never
# meets another application's. The second key is the schema, so catalogs in different schemas of
# one database (the tests, staging beside production) migrate independently.
MIGRATION_LOCK_KEY = 0x6D72


def _config() -> "Config":
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "worker:migrations")
    return config


def _serialize_migrations(connection: Connection) -> None:
    """Wait until no other migration of this schema is running; released when the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key, hashtext(coalesce(current_schema(), '')))"),
                           {"key": MIGRATION_LOCK_KEY})


def upgrade(db: Database, revision: str = "head") -> str:
    """Migrate to `revision` under one transaction; returns the revision now current."""
    return migrate(db, revision)[1]


def migrate(db: Database, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to `revision` under one transaction; (the revision found, the revision now current). The first is
    read under the migration lock: an upgrade that waited for another one reports the revision that one left,
    not the empty catalog both saw before."""
    from alembic import command

    config = _config()
    with db.engine.begin() as connection:
        _serialize_migrations(connection)
        found = _revision(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return found, current_revision(db)


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def current_revision(db: Database) -> str | None:
    """The catalog's revision as Alembic recorded it (its `alembic_version` table), None when unmigrated."""
    with db.engine.connect() as connection:
        return _revision(connection)


def head_revision() -> str:
    """The newest revision among the migration scripts, as Alembic finds it."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def is_current(db: Database) -> bool:
    return current_revision(db) == HEAD


def downgrade(db: Database, revision: str) -> str | None:
    """Migrate back to `revision` ("base" for an empty catalog); returns the revision now current."""
    from alembic import command

    config = _config()
    with db.engine.begin() as connection:
        _serialize_migrations(connection)
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    return current_revision(db)
