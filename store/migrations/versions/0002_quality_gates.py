"""quality gates per response, steering lineage, raw judge probabilities

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('response') as batch:
        batch.add_column(sa.Column('quality', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('steering', sa.JSON(), nullable=True))
    with op.batch_alter_table('judgment') as batch:
        batch.add_column(sa.Column('prob_x_raw', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('judgment') as batch:
        batch.drop_column('prob_x_raw')
    with op.batch_alter_table('response') as batch:
        batch.drop_column('steering')
        batch.drop_column('quality')
