"""ORM rows. The schema itself is owned by the Alembic migrations in `studio/migrations`; these classes must
match the head revision (a test compares them)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAME_MAX = 200
NOTE_MAX = 2000
YAML_MAX_BYTES = 1 << 20  # 1 MiB of UTF-8
TRAINING_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
TRAINING_ORIGINS = ("studio", "shipped")  # trained in the studio; shipped trained weights (studio.seed)
SHIPPED_KINDS = ("recipe", "weights")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite has no time zones), always handed back timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Recipe(Base):
    __tablename__ = "recipes"
    __table_args__ = (
        # Unique among live recipes only: a deleted recipe's name can be reused, and restoring checks again.
        Index("uq_recipes_live_name", "name", unique=True, sqlite_where=text("deleted_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    versions: Mapped[list[RecipeVersion]] = relationship(
        back_populates="recipe", order_by="RecipeVersion.number", viewonly=True
    )


class RecipeVersion(Base):
    """One saved state of a recipe. Append-only: rows are never updated or deleted."""

    __tablename__ = "recipe_versions"
    __table_args__ = (UniqueConstraint("recipe_id", "number", name="uq_recipe_versions_recipe_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipe_id: Mapped[int] = mapped_column(ForeignKey("recipes.id", ondelete="RESTRICT"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(NOTE_MAX), default="")
    yaml_text: Mapped[str] = mapped_column(Text)
    # The version this one was edited from (possibly in another recipe, for duplicates); None for a fresh recipe.
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("recipe_versions.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    recipe: Mapped[Recipe] = relationship(back_populates="versions", viewonly=True)


class Run(Base):
    """One prompt run against one recipe version: what went in, what came out, and the routing trace."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_version_created", "version_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("recipe_versions.id", ondelete="RESTRICT"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    output_text: Mapped[str] = mapped_column(Text, default="")
    trace: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """Router / adapter training of one recipe version. Status and metrics are updated as training proceeds."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("recipe_versions.id", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    loss_curve: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    weights_path: Mapped[str | None] = mapped_column(String(4096), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # One of TRAINING_ORIGINS. Added by revision 0003.
    origin: Mapped[str] = mapped_column(String(20), default="studio", server_default="studio")


class Evaluation(Base):
    """Evaluation results of one recipe version, optionally after one training run. Added by revision 0002."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("recipe_versions.id", ondelete="RESTRICT"), index=True)
    training_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_runs.id", ondelete="RESTRICT"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(NAME_MAX), default="", server_default="")
    results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ShippedAsset(Base):
    """One shipped file (an example recipe, or trained weights) seeded into the database by `studio.seed`, and
    the rows it became. Kept even if the user deletes or renames the recipe, so seeding never brings it back.
    Added by revision 0003."""

    __tablename__ = "shipped_assets"
    __table_args__ = (
        UniqueConstraint("kind", "asset", "sha256", name="uq_shipped_assets_kind_asset_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # one of SHIPPED_KINDS
    asset: Mapped[str] = mapped_column(String(NAME_MAX))  # file name, e.g. "fused-token.yaml"
    sha256: Mapped[str] = mapped_column(String(64))  # of the file as seeded
    version_id: Mapped[int] = mapped_column(ForeignKey("recipe_versions.id", ondelete="RESTRICT"))
    training_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_runs.id", ondelete="RESTRICT"), default=None
    )
    seeded_at: Mapped[datetime] = mapped_column(default=utcnow)
