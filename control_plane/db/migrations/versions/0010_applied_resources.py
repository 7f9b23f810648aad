"""applied_resources: the applied-by marker of declarative resources (tessera apply, --config-dir)

Revision ID: 0010
Revises: 0009

Expand-only (docs/operations.md): a new table; older control planes never read it.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'applied_resources',
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('manager', sa.String(length=63), nullable=False),
        sa.Column('target', sa.String(length=128), nullable=False),
        sa.Column('applied_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'name'),
    )


def downgrade() -> None:
    op.drop_table('applied_resources')
