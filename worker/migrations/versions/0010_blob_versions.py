"""media_items: the object-store version of each blob, and a delete the store refused because the version is locked

Revision ID: 0010
Revises: 0009
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('media_items') as batch:
        # The version ID a versioned bucket gave this blob (NULL: an unversioned store, or recorded before
        # versions were): the sweep deletes exactly this version, so no noncurrent version is left behind.
        batch.add_column(sa.Column('blob_version', sa.String(length=1024), nullable=True))
        # Set while the store refuses to delete the version because it is locked (S3 Object Lock): until
        # when (the retain-until date when the store says, NULL for a legal hold) and why.
        batch.add_column(sa.Column('locked_until', UTCDateTime(), nullable=True))
        batch.add_column(sa.Column('lock_reason', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('media_items') as batch:
        batch.drop_column('lock_reason')
        batch.drop_column('locked_until')
        batch.drop_column('blob_version')
