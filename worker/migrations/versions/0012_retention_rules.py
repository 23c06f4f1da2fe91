"""retention_rules: an org's retention by content type (MIME patterns)

Revision ID: 0012
Revises: 0011
"""
from alembic import op
import sqlalchemy as sa

from worker.db import UTCDateTime, db_now


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'retention_rules',
        sa.Column('org_id', sa.String(length=128), nullable=False),
        sa.Column('mime_pattern', sa.String(length=255), nullable=False),
        sa.Column('retention_seconds', sa.Integer(), nullable=False),
        sa.Column('created_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column('actor', sa.String(length=128), nullable=False),
        sa.CheckConstraint('retention_seconds >= 3600', name=op.f('ck_retention_rules_retention_at_least_1h')),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_retention_rules_org_id_organizations')),
        sa.PrimaryKeyConstraint('org_id', 'mime_pattern', name=op.f('pk_retention_rules')),
    )


def downgrade() -> None:
    op.drop_table('retention_rules')
