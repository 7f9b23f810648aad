"""backend credentials, TLS, health path and timeouts; model aliases and realtime

Revision ID: 0006
Revises: 0005

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('backends') as batch:
        batch.add_column(sa.Column('credential_sealed', sa.Text(), nullable=True))
        batch.add_column(sa.Column('credential_header', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('ca_bundle', sa.Text(), nullable=True))
        batch.add_column(sa.Column('sni', sa.String(length=253), nullable=True))
        batch.add_column(sa.Column('health_path', sa.String(length=256), nullable=True))
        batch.add_column(sa.Column('timeout_seconds', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('idle_timeout_seconds', sa.Integer(), nullable=True))
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('realtime', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        'model_aliases',
        sa.Column('alias', sa.String(length=128), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('alias'),
    )
    op.create_index(op.f('ix_model_aliases_model_id'), 'model_aliases', ['model_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_model_aliases_model_id'), table_name='model_aliases')
    op.drop_table('model_aliases')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('realtime')
    with op.batch_alter_table('backends') as batch:
        for column in (
            'idle_timeout_seconds', 'timeout_seconds', 'health_path', 'sni', 'ca_bundle',
            'credential_header', 'credential_sealed',
        ):
            batch.drop_column(column)
