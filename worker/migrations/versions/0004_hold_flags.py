"""hold flags: org holds mirrored on item rows; claim index without held media

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

CLAIMABLE = "state = 'active' AND held_at IS NULL AND NOT org_held"
HELD = "state = 'active' AND (held_at IS NOT NULL OR org_held)"


def upgrade() -> None:
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('org_held', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.execute(
        "UPDATE media_items SET org_held = true WHERE state = 'active' "
        "AND org_id IN (SELECT id FROM organizations WHERE held_at IS NOT NULL)"
    )
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.drop_index('ix_media_items_active_expiry', postgresql_where=sa.text("state = 'active'"), sqlite_where=sa.text("state = 'active'"))
        batch_op.create_index('ix_media_items_claimable_expiry', ['expires_at'], unique=False,
                              postgresql_where=sa.text(CLAIMABLE), sqlite_where=sa.text(CLAIMABLE))
        batch_op.create_index('ix_media_items_held_expiry', ['expires_at'], unique=False,
                              postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))


def downgrade() -> None:
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.drop_index('ix_media_items_held_expiry', postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))
        batch_op.drop_index('ix_media_items_claimable_expiry', postgresql_where=sa.text(CLAIMABLE), sqlite_where=sa.text(CLAIMABLE))
        batch_op.create_index('ix_media_items_active_expiry', ['expires_at'], unique=False,
                              postgresql_where=sa.text("state = 'active'"), sqlite_where=sa.text("state = 'active'"))
        batch_op.drop_column('org_held')
