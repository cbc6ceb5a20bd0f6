"""shadow: a candidate model's slice scores and series verdicts, kept apart from the active one's

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shadow_score",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("instance_id", sa.Integer(),
                  sa.ForeignKey("instance.id", ondelete="CASCADE"), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("position", sa.Float(), nullable=True),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("p_nondiagnostic", sa.Float(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_version.id"),
                  nullable=False),
        sa.UniqueConstraint("instance_id", "frame", "model_version_id"),
    )  # fmt: skip
    op.create_table(
        "shadow_verdict",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_id", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_version.id"),
                  nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("n_slices", sa.Integer(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    op.create_index("ix_shadow_verdict_series", "shadow_verdict", ["series_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_verdict_series", "shadow_verdict")
    op.drop_table("shadow_verdict")
    op.drop_table("shadow_score")
