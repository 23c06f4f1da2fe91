"""holds and hold_items: legal holds by case (item, org and query placements), resolved into held_at/org_held

Revision ID: 0013
Revises: 0011

Existing holds become placements of the case `default`, so `release` without `--case` releases them as before:
one `org` placement per held org, one `item` placement per distinct reason of held active items.
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'holds',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('case_name', sa.String(length=128), nullable=False),
        sa.Column('scope', sa.String(length=8), nullable=False),
        sa.Column('org_id', sa.String(length=128), nullable=True),
        sa.Column('created_after', UTCDateTime(), nullable=True),
        sa.Column('created_before', UTCDateTime(), nullable=True),
        sa.Column('mime_pattern', sa.String(length=255), nullable=True),
        sa.Column('include_future', sa.Boolean(), server_default=sa.text('false'), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('placed_by', sa.String(length=128), nullable=False),
        sa.Column('placed_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column('released_at', UTCDateTime(), nullable=True),
        sa.Column('released_by', sa.String(length=128), nullable=True),
        sa.Column('release_reason', sa.Text(), nullable=True),
        sa.CheckConstraint("scope IN ('item', 'org', 'query')", name=op.f('ck_holds_scope_known')),
        sa.CheckConstraint("scope = 'item' OR org_id IS NOT NULL", name=op.f('ck_holds_org_scoped')),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_holds_org_id_organizations')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_holds')),
    )
    op.create_index('ix_holds_case_name', 'holds', ['case_name'], unique=False)
    op.create_index('ix_holds_open_future', 'holds', ['org_id'], unique=False,
                    postgresql_where=sa.text('released_at IS NULL AND include_future'),
                    sqlite_where=sa.text('released_at IS NULL AND include_future'))
    op.create_table(
        'hold_items',
        sa.Column('hold_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('item_id', sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(['hold_id'], ['holds.id'], name=op.f('fk_hold_items_hold_id_holds')),
        sa.PrimaryKeyConstraint('hold_id', 'item_id', name=op.f('pk_hold_items')),
    )
    op.create_index('ix_hold_items_item_id', 'hold_items', ['item_id'], unique=False)
    # Today's holds, as placements of the case `default`.
    op.execute("""INSERT INTO holds (case_name, scope, org_id, reason, placed_by, placed_at)
        SELECT 'default', 'org', id, COALESCE(hold_reason, 'held before cases'), 'migration', held_at
        FROM organizations WHERE held_at IS NOT NULL""")
    op.execute("""INSERT INTO holds (case_name, scope, reason, placed_by, placed_at)
        SELECT 'default', 'item', COALESCE(hold_reason, 'held before cases'), 'migration', MIN(held_at)
        FROM media_items WHERE held_at IS NOT NULL AND state = 'active'
        GROUP BY COALESCE(hold_reason, 'held before cases')""")
    op.execute("""INSERT INTO hold_items (hold_id, item_id)
        SELECT h.id, m.id FROM media_items AS m
        JOIN holds AS h ON h.scope = 'item' AND h.placed_by = 'migration'
            AND h.reason = COALESCE(m.hold_reason, 'held before cases')
        WHERE m.held_at IS NOT NULL AND m.state = 'active'""")


def downgrade() -> None:
    op.drop_index('ix_hold_items_item_id', table_name='hold_items')
    op.drop_table('hold_items')
    op.drop_index('ix_holds_open_future', table_name='holds')
    op.drop_index('ix_holds_case_name', table_name='holds')
    op.drop_table('holds')
