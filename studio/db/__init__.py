"""Persistence of the studio: SQLAlchemy 2 over SQLite, schema by Alembic migrations, one session per call.

repo = Repository()            # MANGO_DB_URL, or mango.db in the data folder; migrates to head
v1 = repo.create_recipe("demo", yaml_text, note="first")
v2 = repo.save_version(v1.recipe_id, new_text, note="more slots", parent_version=1)
"""

from .diff import KeyChange, SlotChange, YamlDiff, diff_yaml
from .engine import create_db_engine, default_data_dir, head_revision, init_db, resolve_url, upgrade
from .errors import (
    ConflictError,
    DuplicateNameError,
    InputTooLongError,
    NotFoundError,
    StorageError,
    VersionConflictError,
)
from .repository import (
    EvaluationInfo,
    RecipeInfo,
    Repository,
    RunInfo,
    ShippedSeedResult,
    ShippedWeights,
    TrainedResultInfo,
    TrainingRunInfo,
    VersionDiff,
    VersionInfo,
    get_repository,
    trained_result_label,
)

__all__ = [
    "ConflictError",
    "DuplicateNameError",
    "EvaluationInfo",
    "InputTooLongError",
    "KeyChange",
    "NotFoundError",
    "RecipeInfo",
    "Repository",
    "RunInfo",
    "ShippedSeedResult",
    "ShippedWeights",
    "SlotChange",
    "StorageError",
    "TrainedResultInfo",
    "TrainingRunInfo",
    "VersionConflictError",
    "VersionDiff",
    "VersionInfo",
    "YamlDiff",
    "create_db_engine",
    "default_data_dir",
    "diff_yaml",
    "get_repository",
    "head_revision",
    "init_db",
    "resolve_url",
    "trained_result_label",
    "upgrade",
]
