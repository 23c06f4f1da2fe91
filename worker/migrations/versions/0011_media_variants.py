"""media_variants: the derived blobs of an item (thumbnails, previews, transcodes), which live and go with it

Revision ID: 0011
Revises: 0010
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    key = sa.String(length=1024)
    if op.get_bind().dialect.name == "postgresql":
        key = sa.String(length=1024, collation="C")  # byte order, like media_items.storage_key
    op.create_table(
        'media_variants',
        sa.Column('storage_key', key, nullable=False),
        sa.Column('item_id', sa.String(length=128), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('mime_type', sa.String(length=255), nullable=False),
        # The version ID a versioned bucket gave the blob (NULL: unversioned, or not recorded).
        sa.Column('blob_version', sa.String(length=1024), nullable=True),
        sa.Column('created_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.CheckConstraint('size_bytes >= 0', name=op.f('ck_media_variants_size_not_negative')),
        sa.ForeignKeyConstraint(['item_id'], ['media_items.id'], name=op.f('fk_media_variants_item_id_media_items')),
        sa.PrimaryKeyConstraint('storage_key', name=op.f('pk_media_variants')),
    )
    op.create_index('ix_media_variants_item_id', 'media_variants', ['item_id'], unique=False)
    with op.batch_alter_table('media_items') as batch:
        # Set in the transaction that inserts an item's first variant: the claim returns it, so a batch of items
        # without variants (nearly all of them) costs the sweep no variant query.
        batch.add_column(sa.Column('has_variants', sa.Boolean(), server_default=sa.text('false'), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('media_items') as batch:
        batch.drop_column('has_variants')
    op.drop_index('ix_media_variants_item_id', table_name='media_variants')
    op.drop_table('media_variants')
