"""work_progress: items claimed/done/failed per run, stage, worker and host (for `cai status`)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 23:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'work_progress',
        sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('host', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('claimed', sa.Integer(), nullable=False),
        sa.Column('done', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('run_id', 'stage'),
    )
    with op.batch_alter_table('work_progress') as batch:
        batch.create_index(batch.f('ix_work_progress_host'), ['host'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('work_progress') as batch:
        batch.drop_index(batch.f('ix_work_progress_host'))
    op.drop_table('work_progress')
