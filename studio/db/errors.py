"""Typed storage errors. All are `mol.errors.StorageError`, so the studio shows them like any user error."""

from __future__ import annotations

from mol.errors import ConflictError, StorageError

__all__ = [
    "ConflictError",
    "DuplicateNameError",
    "InputTooLongError",
    "NotFoundError",
    "StorageError",
    "VersionConflictError",
]


class NotFoundError(StorageError):
    """No recipe, version, run, training run or evaluation with that id (or name)."""


class DuplicateNameError(StorageError):
    """A recipe with this name already exists (names are unique among recipes that are not deleted)."""


class InputTooLongError(StorageError):
    """A name, note or recipe text is over its limit."""


class VersionConflictError(ConflictError):
    """Raised by `save_version` AFTER the new version was committed: nothing was lost, but the edit was based on
    version `based_on` while version `latest` had been saved in the meantime. `version` / `version_id` name the
    version just stored, so the caller can show it next to `latest` (see `Repository.compare_versions`)."""

    def __init__(self, recipe_id: int, version: int, version_id: int, based_on: int, latest: int) -> None:
        super().__init__(
            f"Saved as version {version}, but it was based on version {based_on} and version {latest} had been "
            f"saved in the meantime. Both are kept: compare versions {latest} and {version} to merge the changes."
        )
        self.recipe_id = recipe_id
        self.version = version
        self.version_id = version_id
        self.based_on = based_on
        self.latest = latest

    def __reduce__(self):  # picklable across processes despite the custom __init__
        return (type(self), (self.recipe_id, self.version, self.version_id, self.based_on, self.latest))
