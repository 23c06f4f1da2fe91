"""the org index holds live rows only: a tombstone leaves it, so an expiry deletion inserts nothing there

Revision ID: 0014
Revises: 0011
"""
from alembic import op

from config.errors import RetentionError


revision = '0014'
down_revision = '0013'
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
    if op.get_bind().dialect.name == "postgresql":
        _require_the_live_index()
    op.execute(f"DROP INDEX IF EXISTS {OLD}")


def _require_the_live_index() -> None:
    """Abort (the whole migration rolls back, the old index kept) when the index kept by IF NOT EXISTS is not the
    one this migration builds: a `CREATE INDEX CONCURRENTLY` that failed leaves an invalid index of that name, which
    no plan reads, and one built by hand may have other columns or no predicate. Either would leave every org query
    on a sequential scan once the old index is gone."""
    found = op.get_bind().exec_driver_sql(
        "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = %(name)s AND c.relnamespace = current_schema()::regnamespace", {"name": NEW}).first()
    valid, definition = found if found is not None else (False, "")
    wanted = "(org_id, state) WHERE ((state)::text <> 'deleted'::text)"
    if not valid or not definition.endswith(wanted):
        why = "is invalid (a failed CREATE INDEX CONCURRENTLY?)" if not valid else f"is not on {wanted}"
        raise RetentionError(f"index {NEW} already exists and {why}: {definition}; drop it (DROP INDEX CONCURRENTLY {NEW}) "
                             "and upgrade again; nothing was migrated.")


def downgrade() -> None:
    op.execute(f"CREATE INDEX IF NOT EXISTS {OLD} ON media_items (org_id, state)")
    op.execute(f"DROP INDEX IF EXISTS {NEW}")
