"""tombstones by deletion time: the index status' lateness figures and tombstone compaction read; autovacuum for a large catalog

Revision ID: 0008
Revises: 0007
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TOMBSTONE = "state = 'deleted'"

# Vacuum and analyze media_items after 1 % of its rows changed instead of PostgreSQL's default 20 %:
# every deletion leaves two dead row versions (claim, finalize), and at 100 million rows the default
# would let 20 million pile up in the claim's indexes before a vacuum. Inserts (imports) count too,
# so a freshly imported catalog gets its statistics and visibility map without waiting.
AUTOVACUUM = ("autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.01, "
              "autovacuum_vacuum_insert_scale_factor = 0.01")
AUTOVACUUM_NAMES = "autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor, autovacuum_vacuum_insert_scale_factor"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # IF NOT EXISTS: on a catalog too large to lock for the build, create it first with
        # CREATE INDEX CONCURRENTLY (same name and predicate) and this migration keeps it.
        op.execute(f"CREATE INDEX IF NOT EXISTS ix_media_items_deleted_at ON media_items (deleted_at) WHERE {TOMBSTONE}")
        op.execute(f"ALTER TABLE media_items SET ({AUTOVACUUM})")
    else:
        op.execute(f"CREATE INDEX IF NOT EXISTS ix_media_items_deleted_at ON media_items (deleted_at) WHERE {TOMBSTONE}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE media_items RESET ({AUTOVACUUM_NAMES})")
    op.execute("DROP INDEX IF EXISTS ix_media_items_deleted_at")
