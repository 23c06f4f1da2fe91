"""Create or migrate the schema with Alembic, from code (the CLI, `run`, and the tests)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from worker.db import Database


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", "worker:migrations")
    return config


def upgrade(db: Database, revision: str = "head") -> str:
    """Migrate to `revision` under one transaction; returns the revision now current."""
    config = _config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return current_revision(db)


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def is_current(db: Database) -> bool:
    return current_revision(db) == head_revision()


def downgrade(db: Database, revision: str) -> str | None:
    """Migrate back to `revision` ("base" for an empty catalog); returns the revision now current."""
    config = _config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    return current_revision(db)
