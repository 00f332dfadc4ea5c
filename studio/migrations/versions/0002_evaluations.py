"""Evaluations table (results of a version, optionally after a training run); runs listed by version and time.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "version_id",
            sa.Integer(),
            sa.ForeignKey("recipe_versions.id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column(
            "training_run_id",
            sa.Integer(),
            sa.ForeignKey("training_runs.id", ondelete="RESTRICT"),
            nullable=True,
        ),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_evaluations_version_id", "evaluations", ["version_id"])
    op.create_index("ix_evaluations_training_run_id", "evaluations", ["training_run_id"])
    # The run history lists a version's runs newest first.
    op.create_index("ix_runs_version_created", "runs", ["version_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_version_created", table_name="runs")
    op.drop_table("evaluations")
