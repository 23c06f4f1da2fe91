"""the org index holds live rows only: a tombstone leaves it, so an expiry deletion inserts nothing there

Revision ID: 0014
Revises: 0011
"""
from alembic import op


revision = '0014'
down_revision = '0011'
branch_labels = None
depends_on = None

LIVE = "state <> 'deleted'"
NEW = "ix_media_items_live_org_id_state"
OLD = "ix_media_items_org_id_state"

# Every query that reads an org's rows by this index wants its live rows (org show, org set, org holds, org
# purges); a tombstone's entry was dead weight: one more B-tree insert (WAL) per deletion, and most of the index
# on a catalog that keeps its tombstones. The build reads the whole table under a lock that blocks writes (not
# reads) for its duration. IF NOT EXISTS: on a catalog too large for that, create it first with
# `CREATE INDEX CONCURRENTLY ix_media_items_live_org_id_state ON media_items (org_id, state) WHERE state <> 'deleted'`
# (same name, columns and predicate) and this migration keeps it; dropping the old index is then quick.


def upgrade() -> None:
    op.execute(f"CREATE INDEX IF NOT EXISTS {NEW} ON media_items (org_id, state) WHERE {LIVE}")
    op.execute(f"DROP INDEX IF EXISTS {OLD}")


def downgrade() -> None:
    op.execute(f"CREATE INDEX IF NOT EXISTS {OLD} ON media_items (org_id, state)")
    op.execute(f"DROP INDEX IF EXISTS {NEW}")
