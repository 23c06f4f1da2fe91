"""api_keys: org-scoped keys of the HTTP lookup service (`serve`), stored hashed

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('org_id', sa.String(length=128), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=True),
        sa.Column('secret_sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column('created_by', sa.String(length=128), nullable=False),
        sa.Column('revoked_at', UTCDateTime(), nullable=True),
        sa.Column('revoked_by', sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_api_keys_org_id_organizations')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    )
    op.create_index('ix_api_keys_org_id', 'api_keys', ['org_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_api_keys_org_id', table_name='api_keys')
    op.drop_table('api_keys')
