"""review: people's verdicts on preference pairs (`cai review`)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'review',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('pair_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('reviewer', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('verdict', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('left', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('ai_shown', sa.Boolean(), nullable=False),
        sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['pair_id'], ['preference_pair.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('review') as batch:
        batch.create_index('ix_review_pair_reviewer', ['pair_id', 'reviewer'], unique=False)
        batch.create_index(batch.f('ix_review_reviewer'), ['reviewer'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('review') as batch:
        batch.drop_index(batch.f('ix_review_reviewer'))
        batch.drop_index('ix_review_pair_reviewer')
    op.drop_table('review')
