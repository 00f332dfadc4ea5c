"""Shipped examples: where a training run came from (`training_runs.origin`), and a record of every shipped
recipe and weights file seeded into the database (`shipped_assets`), so seeding is idempotent and a shipped
recipe the user deleted or renamed is not brought back.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (no table copy): existing runs were all made in the studio.
    op.add_column(
        "training_runs", sa.Column("origin", sa.String(20), nullable=False, server_default="studio")
    )
    op.create_table(
        "shipped_assets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("asset", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
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
        sa.Column("seeded_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("kind", "asset", "sha256", name="uq_shipped_assets_kind_asset_sha256"),
    )


def downgrade() -> None:
    op.drop_table("shipped_assets")
    # SQLite >= 3.35 drops a plain column in place (no table copy, so the foreign keys into it stay valid).
    op.drop_column("training_runs", "origin")
