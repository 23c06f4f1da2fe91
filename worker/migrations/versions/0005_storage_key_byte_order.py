"""storage keys in byte order on PostgreSQL (COLLATE "C")

Storage keys are byte strings, not words: `verify` merges the catalog's keys with the store's
listing, which S3 and the filesystem store give in byte order. In a database whose default collation
is a language's (en_US.UTF-8), `ORDER BY storage_key` follows that language instead and the merge
would need a full sort per page. With "C" the unique index on the column is in byte order. SQLite's
default (BINARY) already is.

Revision ID: 0005
Revises: 0004
"""
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Same type, another collation: PostgreSQL keeps the table and rebuilds the unique index.
        op.execute('ALTER TABLE media_items ALTER COLUMN storage_key TYPE varchar(1024) COLLATE "C"')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE media_items ALTER COLUMN storage_key TYPE varchar(1024) COLLATE "default"')
