"""key_reservations: the catalog's arbitration of every blob write and delete; catalog_identity: what binds a store to this catalog

Revision ID: 0009
Revises: 0008
"""
import uuid

from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    key = sa.String(length=1024)
    if op.get_bind().dialect.name == "postgresql":
        key = sa.String(length=1024, collation="C")  # byte order, like media_items.storage_key
    op.create_table(
        'key_reservations',
        sa.Column('storage_key', key, nullable=False),
        sa.Column('token', sa.String(length=32), nullable=False),
        sa.Column('purpose', sa.String(length=16), nullable=False),
        sa.Column('media_id', sa.String(length=128), nullable=True),
        sa.Column('reserved_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.PrimaryKeyConstraint('storage_key', name=op.f('pk_key_reservations')),
    )
    op.create_index('ix_key_reservations_token', 'key_reservations', ['token'], unique=False)
    op.create_table(
        'catalog_identity',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('created_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column('store_url', sa.Text(), nullable=True),
        sa.Column('bound_at', UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_catalog_identity')),
    )
    # One identity per catalog, made here: a catalog restored from a dump keeps it, a new one gets its own.
    op.execute(sa.text("INSERT INTO catalog_identity (id) VALUES (:id)").bindparams(id=uuid.uuid4().hex))


def downgrade() -> None:
    op.drop_table('catalog_identity')
    op.drop_index('ix_key_reservations_token', table_name='key_reservations')
    op.drop_table('key_reservations')
