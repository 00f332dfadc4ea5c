"""Typed user errors. Every error a user can cause is a `MolError` with a message that says what was wrong
and what to do; the CLI prints it and exits with status 2, the studio shows it inline."""

from __future__ import annotations


class MolError(Exception):
    """Base class of every error caused by user input (recipes, paths, models, data)."""


class RecipeError(MolError):
    """The recipe is malformed or inconsistent (bad YAML, missing keys, unknown aliases, bad layers)."""


class ModelNotFoundError(MolError):
    """A model folder does not exist, or a Hub id is not cached while offline."""


class UnsupportedArchitectureError(MolError):
    """The model's architecture has no family file."""


class IncompatibleModelsError(MolError):
    """Models in one recipe cannot be fused (different tokenizers or vocabularies)."""


class CheckpointError(MolError):
    """A checkpoint is unreadable: corrupt or truncated safetensors, a config that lies, `.bin` without opt-in."""


class DataError(MolError):
    """Training or evaluation data is missing, empty or unreadable."""


class ResourceError(MolError):
    """Out of memory or over a configured limit (prompt length, new tokens, recipe size)."""


class StorageError(MolError):
    """A saved recipe, version or run cannot be read or written."""


class ConflictError(StorageError):
    """A save was based on a version that is no longer the latest; both versions are kept."""


class AccessError(MolError):
    """Hosted mode refused a path or an option (outside the allow-list, remote code, `.bin`)."""
