"""catalog: organizations, media items, audit events

Revision ID: 0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', UTCDateTime(), server_default=db_now(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('org_id', sa.String(length=128), nullable=True),
    sa.Column('media_id', sa.String(length=128), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_org_id_at', ['org_id', 'at'], unique=False)

    op.create_table('organizations',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('retention_seconds', sa.Integer(), nullable=False),
    sa.Column('held_at', UTCDateTime(), nullable=True),
    sa.Column('hold_reason', sa.Text(), nullable=True),
    sa.Column('created_at', UTCDateTime(), server_default=db_now(), nullable=False),
    sa.Column('updated_at', UTCDateTime(), server_default=db_now(), nullable=False),
    sa.CheckConstraint('retention_seconds >= 3600', name=op.f('ck_organizations_retention_at_least_1h')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_organizations'))
    )
    op.create_table('media_items',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('org_id', sa.String(length=128), nullable=False),
    sa.Column('storage_key', sa.String(length=1024), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('mime_type', sa.String(length=255), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.Column('ttl_seconds', sa.Integer(), nullable=True),
    sa.Column('expires_at', UTCDateTime(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('held_at', UTCDateTime(), nullable=True),
    sa.Column('hold_reason', sa.Text(), nullable=True),
    sa.Column('deletion_reason', sa.String(length=16), nullable=True),
    sa.Column('claim_token', sa.String(length=32), nullable=True),
    sa.Column('claimed_at', UTCDateTime(), nullable=True),
    sa.Column('lease_until', UTCDateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('deleted_at', UTCDateTime(), nullable=True),
    sa.CheckConstraint("state IN ('active', 'deleting', 'deleted')", name=op.f('ck_media_items_state_known')),
    sa.CheckConstraint('size_bytes >= 0', name=op.f('ck_media_items_size_not_negative')),
    sa.CheckConstraint('ttl_seconds IS NULL OR ttl_seconds BETWEEN 3600 AND 2592000', name=op.f('ck_media_items_ttl_bounds')),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_media_items_org_id_organizations')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_media_items')),
    sa.UniqueConstraint('storage_key', name=op.f('uq_media_items_storage_key'))
    )
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.create_index('ix_media_items_active_expiry', ['expires_at'], unique=False, postgresql_where=sa.text("state = 'active'"), sqlite_where=sa.text("state = 'active'"))
        batch_op.create_index('ix_media_items_deleting_lease', ['lease_until'], unique=False, postgresql_where=sa.text("state = 'deleting'"), sqlite_where=sa.text("state = 'deleting'"))
        batch_op.create_index('ix_media_items_org_id_state', ['org_id', 'state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('media_items', schema=None) as batch_op:
        batch_op.drop_index('ix_media_items_org_id_state')
        batch_op.drop_index('ix_media_items_deleting_lease', postgresql_where=sa.text("state = 'deleting'"), sqlite_where=sa.text("state = 'deleting'"))
        batch_op.drop_index('ix_media_items_active_expiry', postgresql_where=sa.text("state = 'active'"), sqlite_where=sa.text("state = 'active'"))

    op.drop_table('media_items')
    op.drop_table('organizations')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_org_id_at')

    op.drop_table('audit_events')
