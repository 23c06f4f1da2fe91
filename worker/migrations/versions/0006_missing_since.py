"""missing_since: when reconcile first saw an active item's blob missing

Reconcile tombstones an unheld item whose blob is missing only once that is confirmed (still missing
a grace period later) or the item expired; until then the item stays active and this column says
since when its blob has been missing (cleared when the blob is seen again). The partial index keeps
`status` and the exporter's count of such items cheap.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

MISSING = "missing_since IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('missing_since', UTCDateTime(), nullable=True))
        batch_op.create_index('ix_media_items_missing_since', ['missing_since'], unique=False,
                              postgresql_where=sa.text(MISSING), sqlite_where=sa.text(MISSING))


def downgrade() -> None:
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.drop_index('ix_media_items_missing_since', postgresql_where=sa.text(MISSING), sqlite_where=sa.text(MISSING))
        batch_op.drop_column('missing_since')
