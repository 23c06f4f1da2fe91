"""volume: samples for the time-to-full projection, the fleet's volume alert state

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('volume_samples',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('taken_at', UTCDateTime(), server_default=db_now(), nullable=False),
    sa.Column('used_bytes', sa.BigInteger(), nullable=False),
    sa.Column('total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('used_inodes', sa.BigInteger(), nullable=True),
    sa.Column('total_inodes', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_volume_samples'))
    )
    with op.batch_alter_table('volume_samples', schema=None) as batch_op:
        batch_op.create_index('ix_volume_samples_taken_at', ['taken_at'], unique=False)

    op.create_table('volume_alerts',
    sa.Column('volume', sa.String(length=64), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=16), nullable=True),
    sa.Column('since', UTCDateTime(), server_default=db_now(), nullable=False),
    sa.Column('previous_level', sa.String(length=16), nullable=False),
    sa.Column('previous_since', UTCDateTime(), nullable=True),
    sa.Column('notified_at', UTCDateTime(), nullable=True),
    sa.Column('delivery_pending', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('version', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.CheckConstraint("level IN ('ok', 'warning', 'critical')", name=op.f('ck_volume_alerts_level_known')),
    sa.CheckConstraint("previous_level IN ('ok', 'warning', 'critical')", name=op.f('ck_volume_alerts_previous_level_known')),
    sa.PrimaryKeyConstraint('volume', name=op.f('pk_volume_alerts'))
    )


def downgrade() -> None:
    op.drop_table('volume_alerts')
    with op.batch_alter_table('volume_samples', schema=None) as batch_op:
        batch_op.drop_index('ix_volume_samples_taken_at')

    op.drop_table('volume_samples')
