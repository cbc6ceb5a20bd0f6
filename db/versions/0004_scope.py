"""scope: why a series is not assessed, and each slice's distance to the training data

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series_verdict") as batch:
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
    with op.batch_alter_table("slice_score") as batch:
        batch.add_column(sa.Column("distance", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("slice_score") as batch:
        batch.drop_column("distance")
    with op.batch_alter_table("series_verdict") as batch:
        batch.drop_column("reason")
