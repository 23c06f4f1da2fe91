"""sweep runs: what each sweep did, and one scheduled sweep per schedule slot

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    counter = lambda name: sa.Column(name, sa.BigInteger(), server_default=sa.text('0'), nullable=False)  # noqa: E731
    op.create_table('sweep_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('slot', sa.String(length=64), nullable=True),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('started_at', UTCDateTime(), server_default=db_now(), nullable=False),
    sa.Column('finished_at', UTCDateTime(), nullable=True),
    sa.Column('fanout', sa.Integer(), server_default=sa.text('0'), nullable=False),
    counter('claimed'), counter('deleted'), counter('failed'), counter('bytes_freed'), counter('held_skipped'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sweep_runs')),
    sa.UniqueConstraint('slot', name=op.f('uq_sweep_runs_slot'))
    )
    with op.batch_alter_table('sweep_runs', schema=None) as batch_op:
        batch_op.create_index('ix_sweep_runs_started_at', ['started_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('sweep_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_sweep_runs_started_at')
    op.drop_table('sweep_runs')
