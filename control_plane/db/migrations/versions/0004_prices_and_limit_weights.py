"""model prices, token-limit weights

Revision ID: 0004
Revises: 0003

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_prices',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('effective_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('input_micros', sa.BigInteger(), nullable=False),
    sa.Column('output_micros', sa.BigInteger(), nullable=False),
    sa.Column('cached_micros', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_model_prices_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_prices')),
    sa.UniqueConstraint('model_id', 'effective_at', name=op.f('uq_model_prices_model_id'))
    )
    op.create_index(op.f('ix_model_prices_model_id'), 'model_prices', ['model_id'], unique=False)
    with op.batch_alter_table('limits') as batch:
        batch.add_column(sa.Column('prompt_weight', sa.Integer(), server_default='100', nullable=False))
        batch.add_column(sa.Column('completion_weight', sa.Integer(), server_default='100', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('limits') as batch:
        batch.drop_column('completion_weight')
        batch.drop_column('prompt_weight')
    op.drop_index(op.f('ix_model_prices_model_id'), table_name='model_prices')
    op.drop_table('model_prices')
