"""usage_records.trace_id: the W3C trace of the request, to find its spans from a ledger row

Revision ID: 0009
Revises: 0008

Expand-only (docs/operations.md): a new nullable column; older meters keep writing.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records') as batch:
        batch.add_column(sa.Column('trace_id', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage_records') as batch:
        batch.drop_column('trace_id')
