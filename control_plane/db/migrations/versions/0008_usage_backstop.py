"""usage_records.backstop: rows billed from an open admission whose usage line never came

Revision ID: 0008
Revises: 0007

Expand-only (docs/operations.md): a new column with a default; older meters keep writing.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records') as batch:
        batch.add_column(sa.Column('backstop', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('usage_records') as batch:
        batch.drop_column('backstop')
