"""The repository: every read and write the studio makes, one short session per call.

Functions return frozen dataclasses (never ORM objects), so results can cross threads and outlive the session.
Writes run in `BEGIN IMMEDIATE` transactions and are retried with backoff when SQLite reports the database as
locked or busy, so concurrent writers (threads or processes) never see "database is locked".

Nothing a user saved is overwritten: a recipe edit appends a version, delete only sets `deleted_at`, restore
clears it. `save_version` on top of a superseded version stores the new version and then raises
`VersionConflictError` (a `mol.errors.ConflictError`) naming it. `save_by_name` is the studio's save: find (or
create) the live recipe of a name and append, in one transaction, so concurrent first saves of a name all land."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, and_, delete, func, select, true
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .diff import YamlDiff, diff_yaml
from .engine import (
    BUSY_TIMEOUT_S,
    copy_sqlite,
    create_db_engine,
    current_revision,
    known_revisions,
    resolve_url,
    sqlite_path,
    upgrade,
)
from .errors import (
    DuplicateNameError,
    InputTooLongError,
    NotFoundError,
    StorageError,
    VersionConflictError,
)
from .models import (
    NAME_MAX,
    NOTE_MAX,
    TRAINING_STATUSES,
    YAML_MAX_BYTES,
    Base,
    Evaluation,
    Recipe,
    RecipeVersion,
    Run,
    ShippedAsset,
    TrainingRun,
    UTCDateTime,
    utcnow,
)

T = TypeVar("T")
EXPORT_FORMAT = "mango-export"
_FINISHED = ("completed", "failed", "cancelled")


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RecipeInfo:
    id: int
    name: str
    created_at: datetime
    deleted_at: datetime | None
    latest_version: int  # versions are numbered 1..latest_version without gaps
    latest_version_id: int
    updated_at: datetime  # when the latest version was saved
    latest_note: str

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True)
class VersionInfo:
    id: int
    recipe_id: int
    recipe_name: str
    number: int
    note: str
    yaml_text: str
    parent_id: int | None  # the version this one was edited or duplicated from
    created_at: datetime


@dataclass(frozen=True)
class VersionDiff:
    old: VersionInfo
    new: VersionInfo
    diff: YamlDiff

    @property
    def identical(self) -> bool:
        return self.diff.identical


@dataclass(frozen=True)
class RunInfo:
    id: int
    version_id: int
    recipe_id: int
    recipe_name: str
    version_number: int
    prompt: str
    settings: dict[str, Any]
    output_text: str
    trace: dict[str, Any] | None  # None in `list_runs` results (traces are large); `get_run` loads it
    created_at: datetime


@dataclass(frozen=True)
class TrainingRunInfo:
    id: int
    version_id: int
    recipe_id: int
    version_number: int
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    loss_curve: list[dict[str, Any]]
    weights_path: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    origin: str = "studio"  # "studio": trained here; "shipped": trained weights that ship with Mango

    @property
    def shipped(self) -> bool:
        return self.origin == "shipped"


@dataclass(frozen=True)
class TrainedResultInfo:
    """A finished training run with weights, as a weight picker offers it: `label` names it for a person
    ("fused-token v1 · shipped", "my-recipe v3 · run 12 · 2000 steps · 2026-12-01 21:40"); `id` is the
    training run id the engine takes."""

    label: str
    run: TrainingRunInfo
    recipe_name: str
    recipe_deleted: bool
    shipped_asset: str | None  # the shipped weights file it was seeded from ("fused-token.safetensors")

    @property
    def id(self) -> int:
        return self.run.id

    @property
    def version_id(self) -> int:
        return self.run.version_id

    @property
    def shipped(self) -> bool:
        return self.run.shipped

    @property
    def weights_available(self) -> bool:
        return bool(self.run.weights_path) and Path(self.run.weights_path).is_file()


@dataclass(frozen=True)
class ShippedWeights:
    """Shipped trained weights to register as a trained result of a shipped recipe (see `seed_shipped_recipe`)."""

    asset: str  # file name, e.g. "fused-token.safetensors"
    sha256: str
    path: str  # absolute path of the weights file
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ShippedSeedResult:
    """What `seed_shipped_recipe` did. `status`: "seeded" (recipe added now), "present" (seeded before: the
    recipe was left as it is, renamed, edited or deleted by the user), "name-taken" (a recipe of the user's has
    this name: nothing was added)."""

    asset: str
    recipe_name: str
    status: str
    version_id: int | None
    added_training_runs: tuple[int, ...] = ()
    skipped_weights: tuple[str, ...] = ()  # weights not added, each with the reason


@dataclass(frozen=True)
class EvaluationInfo:
    id: int
    version_id: int
    training_run_id: int | None
    name: str
    results: dict[str, Any]
    created_at: datetime


# ---------------------------------------------------------------------------------------------- checks


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StorageError("A recipe needs a name.")
    name = name.strip()
    if len(name) > NAME_MAX:
        raise InputTooLongError(f"Recipe names are at most {NAME_MAX} characters; this one has {len(name)}.")
    return name


def _check_note(note: str | None) -> str:
    note = note or ""
    if not isinstance(note, str):
        raise StorageError("A version note must be text.")
    if len(note) > NOTE_MAX:
        raise InputTooLongError(f"Version notes are at most {NOTE_MAX} characters; this one has {len(note)}.")
    return note


def _check_yaml(text: str) -> str:
    if not isinstance(text, str):
        raise StorageError("A recipe must be saved as YAML text.")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > YAML_MAX_BYTES:
        raise InputTooLongError(
            f"Recipe YAML is at most {YAML_MAX_BYTES} bytes (1 MiB); this one has {size}."
        )
    return text


def _check_json(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise StorageError(f"The {what} cannot be stored as JSON: {e}") from e
    return value


def _is_busy(e: OperationalError) -> bool:
    code = getattr(e.orig, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED (and their extended codes)
        return True
    msg = str(e.orig).lower()
    return "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg


def _is_version_number_clash(e: IntegrityError) -> bool:
    msg = str(e.orig)
    return (
        "recipe_versions.recipe_id, recipe_versions.number" in msg
        or "uq_recipe_versions_recipe_number" in msg
    )


def _is_name_clash(e: IntegrityError) -> bool:
    msg = str(e.orig)
    return "recipes.name" in msg or "uq_recipes_live_name" in msg


def _version_info(v: RecipeVersion, recipe_name: str) -> VersionInfo:
    return VersionInfo(
        v.id, v.recipe_id, recipe_name, v.number, v.note, v.yaml_text, v.parent_id, v.created_at
    )


def _training_info(t: TrainingRun, recipe_id: int, number: int) -> TrainingRunInfo:
    return TrainingRunInfo(
        t.id,
        t.version_id,
        recipe_id,
        number,
        t.status,
        dict(t.config or {}),
        dict(t.metrics or {}),
        list(t.loss_curve or []),
        t.weights_path,
        t.error,
        t.created_at,
        t.updated_at,
        t.finished_at,
        t.origin or "studio",
    )


LABEL_SEPARATOR = " · "


def trained_result_label(run: TrainingRunInfo, recipe_name: str) -> str:
    """A person's name for a trained result, never a bare id: "<recipe> v<n> · shipped" for shipped weights,
    else "<recipe> v<n> · run <id> · <steps> steps · <finished, UTC, to the minute>"."""
    head = f"{recipe_name} v{run.version_number}"
    if run.shipped:
        return f"{head}{LABEL_SEPARATOR}shipped"
    parts = [head, f"run {run.id}"]
    steps = run.metrics.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        steps = len(run.loss_curve)
    if steps:
        parts.append(f"{steps} step" + ("" if steps == 1 else "s"))
    when = run.finished_at or run.created_at
    if when is not None:
        parts.append(when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M"))
    return LABEL_SEPARATOR.join(parts)


def _evaluation_info(e: Evaluation) -> EvaluationInfo:
    return EvaluationInfo(e.id, e.version_id, e.training_run_id, e.name, dict(e.results or {}), e.created_at)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file next to `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- repository


class Repository:
    """All persistence of the studio, over one database. Thread-safe; several processes may share the file.

    Opening a repository upgrades the schema to the newest migration (see `studio.db.engine.upgrade`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        migrate: bool = True,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        retry_for_s: float = 60.0,
    ) -> None:
        """`busy_timeout_s`: how long SQLite itself waits for a lock; `retry_for_s`: how long a call keeps
        retrying (with backoff) on "database is locked" before giving up with a `StorageError`."""
        self.url = resolve_url(url)
        self.retry_for_s = retry_for_s
        self.engine: Engine = create_db_engine(self.url, busy_timeout_s=busy_timeout_s)
        if migrate:
            self._call(lambda: upgrade(self.engine))
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(mango_begin="IMMEDIATE"), expire_on_commit=False
        )

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transaction helpers ------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` (one whole transaction), again with jittered exponential backoff while SQLite says
        locked/busy, for up to `retry_for_s` seconds."""
        deadline = time.monotonic() + self.retry_for_s
        attempt = 0
        while True:
            try:
                return fn()
            except OperationalError as e:
                if not _is_busy(e):
                    raise StorageError(f"Database error: {e.orig}") from e
                if time.monotonic() >= deadline:
                    raise StorageError(
                        "The database stayed locked by another writer; nothing was saved. Try again."
                    ) from e
            except IntegrityError as e:
                # Belt and braces: BEGIN IMMEDIATE already serialises numbering, the unique key catches the rest.
                if not _is_version_number_clash(e) or time.monotonic() >= deadline:
                    if _is_name_clash(e):
                        raise DuplicateNameError("A recipe with this name already exists.") from e
                    raise StorageError(f"The database refused the change: {e.orig}") from e
            time.sleep(min(0.5, 0.002 * 2**attempt) * (0.5 + random.random()))
            attempt += 1

    def _write(self, fn: Callable[[Session], T]) -> T:
        def once() -> T:
            with self._writer() as session, session.begin():
                return fn(session)

        return self._call(once)

    def _read(self, fn: Callable[[Session], T]) -> T:
        def once() -> T:
            with self._reader() as session, session.begin():
                return fn(session)

        return self._call(once)

    # -- recipes and versions -----------------------------------------------------------------------

    @staticmethod
    def _recipe(session: Session, recipe_id: int) -> Recipe:
        recipe = session.get(Recipe, recipe_id)
        if recipe is None:
            raise NotFoundError(f"There is no recipe with id {recipe_id}.")
        return recipe

    @staticmethod
    def _ensure_name_free(session: Session, name: str, except_id: int | None = None) -> None:
        stmt = select(Recipe.id).where(Recipe.name == name, Recipe.deleted_at.is_(None))
        if except_id is not None:
            stmt = stmt.where(Recipe.id != except_id)
        if session.scalar(stmt) is not None:
            raise DuplicateNameError(f"A recipe named {name!r} already exists; choose another name.")

    @staticmethod
    def _latest_number(session: Session, recipe_id: int) -> int:
        return (
            session.scalar(select(func.max(RecipeVersion.number)).where(RecipeVersion.recipe_id == recipe_id))
            or 0
        )

    @staticmethod
    def _append_version(
        session: Session, recipe: Recipe, yaml_text: str, note: str, parent_id: int | None
    ) -> RecipeVersion:
        number = Repository._latest_number(session, recipe.id) + 1
        version = RecipeVersion(
            recipe_id=recipe.id,
            number=number,
            note=note,
            yaml_text=yaml_text,
            parent_id=parent_id,
            created_at=utcnow(),
        )
        session.add(version)
        session.flush()
        return version

    def create_recipe(self, name: str, yaml_text: str, note: str = "") -> VersionInfo:
        """A new recipe with its version 1. Raises `DuplicateNameError` if a live recipe has this name."""
        name, yaml_text, note = _check_name(name), _check_yaml(yaml_text), _check_note(note)

        def fn(s: Session) -> VersionInfo:
            self._ensure_name_free(s, name)
            recipe = Recipe(name=name, created_at=utcnow())
            s.add(recipe)
            s.flush()
            return _version_info(self._append_version(s, recipe, yaml_text, note, None), name)

        return self._write(fn)

    def save_version(
        self, recipe_id: int, yaml_text: str, note: str = "", parent_version: int | None = None
    ) -> VersionInfo:
        """Append a version to a recipe and return it.

        `parent_version` is the number of the version the edit started from (None: the latest). If it is not
        the latest any more, the new version is still committed, with `parent_id` pointing at the version it
        was based on, and then `VersionConflictError` is raised carrying `.version` / `.version_id` (the one
        just saved), `.based_on` and `.latest`."""
        yaml_text, note = _check_yaml(yaml_text), _check_note(note)
        info, latest = self._write(
            lambda s: self._append_edit(s, self._recipe(s, recipe_id), yaml_text, note, parent_version)
        )
        if parent_version is not None and parent_version != latest:
            raise VersionConflictError(recipe_id, info.number, info.id, parent_version, latest)
        return info

    def save_by_name(
        self, name: str, yaml_text: str, note: str = "", based_on: tuple[int, int] | None = None
    ) -> VersionInfo:
        """Append a version to the live recipe called `name`, creating the recipe (as version 1) if there is
        none: one write transaction, so clients saving a new name at once all get a version of one recipe.

        `based_on` is (recipe id, version number) the edit started from; it counts only when that recipe is the
        one found (else the edit is taken as based on the latest). A superseded base raises
        `VersionConflictError` after saving, as `save_version` does."""
        name, yaml_text, note = _check_name(name), _check_yaml(yaml_text), _check_note(note)

        def fn(s: Session) -> tuple[VersionInfo, int, int | None]:
            recipe = s.scalar(select(Recipe).where(Recipe.name == name, Recipe.deleted_at.is_(None)))
            if recipe is None:
                recipe = Recipe(name=name, created_at=utcnow())
                s.add(recipe)
                s.flush()
                return _version_info(self._append_version(s, recipe, yaml_text, note, None), name), 0, None
            parent = based_on[1] if based_on is not None and based_on[0] == recipe.id else None
            return (*self._append_edit(s, recipe, yaml_text, note, parent), parent)

        info, latest, parent = self._write(fn)
        if parent is not None and parent != latest:
            raise VersionConflictError(info.recipe_id, info.number, info.id, parent, latest)
        return info

    def _append_edit(
        self, s: Session, recipe: Recipe, yaml_text: str, note: str, parent_version: int | None
    ) -> tuple[VersionInfo, int]:
        """Append a version to a live recipe, its parent being version `parent_version` (None: the latest).
        Returns it and the number that was latest before it."""
        if recipe.deleted_at is not None:
            raise StorageError(f"Recipe {recipe.name!r} is deleted; restore it before saving a new version.")
        latest = self._latest_number(s, recipe.id)
        based_on = latest if parent_version is None else parent_version
        parent = s.scalar(
            select(RecipeVersion).where(
                RecipeVersion.recipe_id == recipe.id, RecipeVersion.number == based_on
            )
        )
        if parent is None and latest:
            raise NotFoundError(f"Recipe {recipe.name!r} has no version {based_on}.")
        version = self._append_version(s, recipe, yaml_text, note, parent.id if parent else None)
        return _version_info(version, recipe.name), latest

    def rename_recipe(self, recipe_id: int, name: str) -> RecipeInfo:
        name = _check_name(name)

        def fn(s: Session) -> None:
            recipe = self._recipe(s, recipe_id)
            if recipe.deleted_at is None:
                self._ensure_name_free(s, name, except_id=recipe_id)
            recipe.name = name

        self._write(fn)
        return self.get_recipe(recipe_id)

    def delete_recipe(self, recipe_id: int) -> RecipeInfo:
        """Soft delete: the recipe leaves the list, its versions and runs stay, `restore_recipe` brings it back."""

        def fn(s: Session) -> None:
            recipe = self._recipe(s, recipe_id)
            if recipe.deleted_at is None:
                recipe.deleted_at = utcnow()

        self._write(fn)
        return self.get_recipe(recipe_id)

    def restore_recipe(self, recipe_id: int, new_name: str | None = None) -> RecipeInfo:
        """Undo a delete. If a live recipe took the name meanwhile, pass `new_name` (else `DuplicateNameError`)."""
        new_name = _check_name(new_name) if new_name is not None else None

        def fn(s: Session) -> None:
            recipe = self._recipe(s, recipe_id)
            if recipe.deleted_at is None:
                return
            name = new_name or recipe.name
            self._ensure_name_free(s, name, except_id=recipe_id)
            recipe.name = name
            recipe.deleted_at = None

        self._write(fn)
        return self.get_recipe(recipe_id)

    def duplicate_recipe(
        self, version_id: int, new_name: str | None = None, note: str | None = None
    ) -> VersionInfo:
        """A new recipe whose version 1 copies version `version_id` (its parent). Default name: "<name> (copy)"."""
        new_name = _check_name(new_name) if new_name is not None else None
        note = _check_note(note) if note is not None else None

        def fn(s: Session) -> VersionInfo:
            source = s.get(RecipeVersion, version_id)
            if source is None:
                raise NotFoundError(f"There is no recipe version with id {version_id}.")
            source_name = self._recipe(s, source.recipe_id).name
            name = new_name
            if name is None:
                base = f"{source_name} (copy)"[:NAME_MAX]
                name, n = base, 2
                while s.scalar(select(Recipe.id).where(Recipe.name == name, Recipe.deleted_at.is_(None))):
                    suffix = f" (copy {n})"
                    name, n = f"{source_name[: NAME_MAX - len(suffix)]}{suffix}", n + 1
            self._ensure_name_free(s, name)
            recipe = Recipe(name=name, created_at=utcnow())
            s.add(recipe)
            s.flush()
            text = note if note is not None else f"Duplicated from {source_name!r} version {source.number}"
            version = self._append_version(s, recipe, source.yaml_text, text[:NOTE_MAX], source.id)
            return _version_info(version, name)

        return self._write(fn)

    def _recipe_infos(self, s: Session, where: Any) -> list[RecipeInfo]:
        latest = (
            select(RecipeVersion.recipe_id, func.max(RecipeVersion.number).label("n"))
            .group_by(RecipeVersion.recipe_id)
            .subquery()
        )
        stmt = (
            select(Recipe, RecipeVersion)
            .join(latest, latest.c.recipe_id == Recipe.id)
            .join(
                RecipeVersion, and_(RecipeVersion.recipe_id == Recipe.id, RecipeVersion.number == latest.c.n)
            )
            .where(where)
            .order_by(RecipeVersion.id.desc())
        )
        return [
            RecipeInfo(r.id, r.name, r.created_at, r.deleted_at, v.number, v.id, v.created_at, v.note)
            for r, v in s.execute(stmt)
        ]

    def list_recipes(self, *, deleted: bool | None = False) -> list[RecipeInfo]:
        """Recipes, most recently edited first. `deleted=False`: live ones; True: the deleted ones; None: all."""
        if deleted is None:
            where: Any = true()
        elif deleted:
            where = Recipe.deleted_at.is_not(None)
        else:
            where = Recipe.deleted_at.is_(None)
        return self._read(lambda s: self._recipe_infos(s, where))

    def get_recipe(self, recipe_id: int) -> RecipeInfo:
        """A recipe by id, deleted or not (see `RecipeInfo.deleted`)."""

        def fn(s: Session) -> RecipeInfo:
            found = self._recipe_infos(s, Recipe.id == recipe_id)
            if not found:
                raise NotFoundError(f"There is no recipe with id {recipe_id}.")
            return found[0]

        return self._read(fn)

    def find_recipe(self, name: str) -> RecipeInfo | None:
        """The live recipe with this name, or None."""
        name = name.strip()
        found = self._read(
            lambda s: self._recipe_infos(s, and_(Recipe.name == name, Recipe.deleted_at.is_(None)))
        )
        return found[0] if found else None

    def name_taken_by_other(self, name: str, recipe_id: int | None = None) -> RecipeInfo | None:
        """The live recipe that a save under `name` would add a version to, when it is not `recipe_id` (the
        recipe being edited; None for a new one); None when the name is free or is that recipe's own. For the
        UI to ask before `save_by_name` appends to someone else's recipe; it changes nothing."""
        if not isinstance(name, str) or not name.strip():
            return None
        found = self.find_recipe(name)
        if found is None or (recipe_id is not None and found.id == recipe_id):
            return None
        return found

    def list_versions(self, recipe_id: int) -> list[VersionInfo]:
        """Every version of a recipe (deleted or not), oldest first."""

        def fn(s: Session) -> list[VersionInfo]:
            recipe = self._recipe(s, recipe_id)
            rows = s.scalars(
                select(RecipeVersion)
                .where(RecipeVersion.recipe_id == recipe_id)
                .order_by(RecipeVersion.number)
            )
            return [_version_info(v, recipe.name) for v in rows]

        return self._read(fn)

    def get_version(self, recipe_id: int, number: int | None = None) -> VersionInfo:
        """Version `number` of a recipe; the latest when `number` is None."""

        def fn(s: Session) -> VersionInfo:
            recipe = self._recipe(s, recipe_id)
            n = self._latest_number(s, recipe_id) if number is None else number
            v = s.scalar(
                select(RecipeVersion).where(RecipeVersion.recipe_id == recipe_id, RecipeVersion.number == n)
            )
            if v is None:
                raise NotFoundError(f"Recipe {recipe.name!r} has no version {n}.")
            return _version_info(v, recipe.name)

        return self._read(fn)

    def get_version_by_id(self, version_id: int) -> VersionInfo:
        def fn(s: Session) -> VersionInfo:
            v = s.get(RecipeVersion, version_id)
            if v is None:
                raise NotFoundError(f"There is no recipe version with id {version_id}.")
            return _version_info(v, self._recipe(s, v.recipe_id).name)

        return self._read(fn)

    def compare_versions(self, old_version_id: int, new_version_id: int) -> VersionDiff:
        """Structured diff of two versions' YAML (any two versions, also across recipes)."""
        old, new = self.get_version_by_id(old_version_id), self.get_version_by_id(new_version_id)
        diff = diff_yaml(
            old.yaml_text,
            new.yaml_text,
            f"{old.recipe_name} v{old.number}",
            f"{new.recipe_name} v{new.number}",
        )
        return VersionDiff(old, new, diff)

    # -- runs ----------------------------------------------------------------------------------------

    @staticmethod
    def _version(session: Session, version_id: int) -> RecipeVersion:
        v = session.get(RecipeVersion, version_id)
        if v is None:
            raise NotFoundError(f"There is no recipe version with id {version_id}.")
        return v

    def add_run(
        self,
        version_id: int,
        prompt: str,
        output_text: str = "",
        *,
        settings: dict[str, Any] | None = None,
        trace: dict[str, Any] | None = None,
    ) -> RunInfo:
        """Record one prompt run. `trace` is `mol.trace.Trace.to_dict()`."""
        settings = _check_json(dict(settings or {}), "run settings")
        trace = _check_json(trace, "routing trace")

        def fn(s: Session) -> int:
            self._version(s, version_id)
            run = Run(
                version_id=version_id,
                prompt=prompt,
                output_text=output_text,
                settings=settings,
                trace=trace,
                created_at=utcnow(),
            )
            s.add(run)
            s.flush()
            return run.id

        return self.get_run(self._write(fn))

    def _run_rows(
        self, s: Session, where: Any, with_trace: bool, limit: int | None = None, offset: int = 0
    ) -> list[RunInfo]:
        cols = [
            Run.id,
            Run.version_id,
            Recipe.id,
            Recipe.name,
            RecipeVersion.number,
            Run.prompt,
            Run.settings,
            Run.output_text,
            Run.trace if with_trace else None,
            Run.created_at,
        ]
        stmt = (
            select(*[c for c in cols if c is not None])
            .join(RecipeVersion, RecipeVersion.id == Run.version_id)
            .join(Recipe, Recipe.id == RecipeVersion.recipe_id)
            .where(where)
            .order_by(Run.id.desc())
            .offset(offset)
            .limit(limit)
        )
        out = []
        for row in s.execute(stmt):
            vals = list(row)
            if not with_trace:
                vals.insert(8, None)
            vals[6] = dict(vals[6] or {})
            out.append(RunInfo(*vals))
        return out

    def list_runs(
        self,
        *,
        recipe_id: int | None = None,
        version_id: int | None = None,
        limit: int | None = 100,
        offset: int = 0,
        include_deleted: bool = False,
    ) -> list[RunInfo]:
        """Runs, newest first, optionally of one recipe or one version. Traces are not loaded (`trace=None`).
        Without a recipe or version filter, runs of deleted recipes are left out unless `include_deleted`."""
        conds: list[Any] = []
        if recipe_id is not None:
            conds.append(Recipe.id == recipe_id)
        if version_id is not None:
            conds.append(Run.version_id == version_id)
        if not conds and not include_deleted:
            conds.append(Recipe.deleted_at.is_(None))
        return self._read(lambda s: self._run_rows(s, and_(true(), *conds), False, limit, offset))

    def get_run(self, run_id: int) -> RunInfo:
        def fn(s: Session) -> RunInfo:
            found = self._run_rows(s, Run.id == run_id, True)
            if not found:
                raise NotFoundError(f"There is no run with id {run_id}.")
            return found[0]

        return self._read(fn)

    # -- training runs -------------------------------------------------------------------------------

    def _training(self, s: Session, training_run_id: int) -> TrainingRunInfo:
        row = s.execute(
            select(TrainingRun, RecipeVersion.recipe_id, RecipeVersion.number)
            .join(RecipeVersion, RecipeVersion.id == TrainingRun.version_id)
            .where(TrainingRun.id == training_run_id)
        ).first()
        if row is None:
            raise NotFoundError(f"There is no training run with id {training_run_id}.")
        return _training_info(*row)

    def create_training_run(
        self,
        version_id: int,
        config: dict[str, Any],
        *,
        status: str = "pending",
        weights_path: str | None = None,
    ) -> TrainingRunInfo:
        if status not in TRAINING_STATUSES:
            raise StorageError(
                f"Unknown training status {status!r}; use one of {', '.join(TRAINING_STATUSES)}."
            )
        config = _check_json(dict(config), "training config")

        def fn(s: Session) -> TrainingRunInfo:
            self._version(s, version_id)
            now = utcnow()
            t = TrainingRun(
                version_id=version_id,
                status=status,
                config=config,
                metrics={},
                loss_curve=[],
                weights_path=weights_path,
                created_at=now,
                updated_at=now,
                finished_at=now if status in _FINISHED else None,
            )
            s.add(t)
            s.flush()
            return self._training(s, t.id)

        return self._write(fn)

    def update_training_run(
        self,
        training_run_id: int,
        *,
        status: str | None = None,
        metrics: dict[str, Any] | None = None,
        loss_curve: list[dict[str, Any]] | None = None,
        append_loss: list[dict[str, Any]] | None = None,
        weights_path: str | None = None,
        error: str | None = None,
    ) -> TrainingRunInfo:
        """Progress of a training run (a record of a process, not user content, so it is updated in place).
        `metrics` are merged into the stored ones; `loss_curve` replaces the curve, `append_loss` extends it."""
        if status is not None and status not in TRAINING_STATUSES:
            raise StorageError(
                f"Unknown training status {status!r}; use one of {', '.join(TRAINING_STATUSES)}."
            )
        _check_json([metrics, loss_curve, append_loss], "training progress")

        def fn(s: Session) -> TrainingRunInfo:
            t = s.get(TrainingRun, training_run_id)
            if t is None:
                raise NotFoundError(f"There is no training run with id {training_run_id}.")
            now = utcnow()
            if status is not None:
                t.status = status
                t.finished_at = now if status in _FINISHED else None
            if metrics:
                t.metrics = {**(t.metrics or {}), **metrics}
            if loss_curve is not None:
                t.loss_curve = list(loss_curve)
            if append_loss:
                t.loss_curve = [*(t.loss_curve or []), *append_loss]
            if weights_path is not None:
                t.weights_path = weights_path
            if error is not None:
                t.error = error
            t.updated_at = now
            s.flush()
            return self._training(s, training_run_id)

        return self._write(fn)

    def get_training_run(self, training_run_id: int) -> TrainingRunInfo:
        return self._read(lambda s: self._training(s, training_run_id))

    def list_training_runs(
        self, *, recipe_id: int | None = None, version_id: int | None = None, limit: int | None = 100
    ) -> list[TrainingRunInfo]:
        """Training runs, newest first."""

        def fn(s: Session) -> list[TrainingRunInfo]:
            stmt = select(TrainingRun, RecipeVersion.recipe_id, RecipeVersion.number).join(
                RecipeVersion, RecipeVersion.id == TrainingRun.version_id
            )
            if recipe_id is not None:
                stmt = stmt.where(RecipeVersion.recipe_id == recipe_id)
            if version_id is not None:
                stmt = stmt.where(TrainingRun.version_id == version_id)
            return [
                _training_info(*row) for row in s.execute(stmt.order_by(TrainingRun.id.desc()).limit(limit))
            ]

        return self._read(fn)

    def seeded_version_ids(self) -> set[int]:
        """The recipe versions seeded from shipped example recipes (studio.seed), not saved by a user."""

        def fn(s: Session) -> set[int]:
            return set(s.scalars(select(ShippedAsset.version_id).where(ShippedAsset.kind == "recipe")))

        return self._read(fn)

    # -- trained results (finished training runs with weights, shipped or trained here) --------------

    def list_trained_results(
        self,
        *,
        version_id: int | None = None,
        recipe_id: int | None = None,
        shipped: bool | None = None,
        include_deleted: bool = False,
        include_missing: bool = False,
    ) -> list[TrainedResultInfo]:
        """Completed training runs that left weights, each with its label (see `trained_result_label`): shipped
        ones first, then newest first. Without a version or recipe filter, those of deleted recipes are left
        out unless `include_deleted`; results whose weights file is gone are left out unless
        `include_missing`. `shipped`: True only shipped, False only trained here, None both."""

        def fn(s: Session) -> list[TrainedResultInfo]:
            stmt = (
                select(TrainingRun, RecipeVersion.recipe_id, RecipeVersion.number, Recipe, ShippedAsset.asset)
                .join(RecipeVersion, RecipeVersion.id == TrainingRun.version_id)
                .join(Recipe, Recipe.id == RecipeVersion.recipe_id)
                .outerjoin(
                    ShippedAsset,
                    and_(ShippedAsset.training_run_id == TrainingRun.id, ShippedAsset.kind == "weights"),
                )
                .where(TrainingRun.status == "completed", TrainingRun.weights_path.is_not(None))
            )
            if version_id is not None:
                stmt = stmt.where(TrainingRun.version_id == version_id)
            if recipe_id is not None:
                stmt = stmt.where(RecipeVersion.recipe_id == recipe_id)
            if version_id is None and recipe_id is None and not include_deleted:
                stmt = stmt.where(Recipe.deleted_at.is_(None))
            if shipped is not None:
                stmt = stmt.where(
                    TrainingRun.origin == "shipped" if shipped else TrainingRun.origin != "shipped"
                )
            stmt = stmt.order_by((TrainingRun.origin == "shipped").desc(), TrainingRun.id.desc())
            out: list[TrainedResultInfo] = []
            for t, rid, number, recipe, asset in s.execute(stmt):
                info = _training_info(t, rid, number)
                label = trained_result_label(info, recipe.name)
                out.append(TrainedResultInfo(label, info, recipe.name, recipe.deleted_at is not None, asset))
            return out

        results = self._read(fn)
        if not include_missing:
            results = [r for r in results if r.weights_available]
        # Labels must tell results apart. Those of studio runs carry the run id already; two shipped ones can
        # clash (two shipped files for one version, or two recipes of one name, one deleted): they get it too.
        counts: dict[str, int] = {}
        for r in results:
            counts[r.label] = counts.get(r.label, 0) + 1
        return [
            r
            if counts[r.label] == 1 or not r.shipped
            else replace(r, label=f"{r.label}{LABEL_SEPARATOR}run {r.id}")
            for r in results
        ]

    def trained_result_choices(
        self, version_id: int | None = None, *, recipe_id: int | None = None
    ) -> list[tuple[str, int]]:
        """(label, training run id) pairs for a weight picker: the usable trained results of one recipe version,
        of one recipe, or (both None) of every live recipe. Labels are never bare ids."""
        return [
            (r.label, r.id) for r in self.list_trained_results(version_id=version_id, recipe_id=recipe_id)
        ]

    # -- shipped examples (studio.seed) --------------------------------------------------------------

    def seed_shipped_recipe(
        self,
        name: str,
        yaml_text: str,
        *,
        asset: str,
        sha256: str,
        note: str = "",
        weights: Sequence[ShippedWeights] = (),
    ) -> ShippedSeedResult:
        """Add one shipped example recipe (as version 1 of a recipe called `name`) and its shipped trained
        weights (as completed training runs of that version, origin "shipped"), in one transaction, once.

        A recipe file seeded before (any content) is not added again, whatever the user did with it since
        (edited, renamed, deleted); weights not seeded yet are still added to that version if its text is
        `yaml_text`. A live recipe of the user's called `name` is never touched: nothing is added
        ("name-taken"). A seeded weights file whose recorded path is gone (a moved checkout) gets `path`."""
        name, yaml_text, note = _check_name(name), _check_yaml(yaml_text), _check_note(note)
        for w in weights:
            _check_json([w.config, w.metrics, w.loss_curve], "shipped training record")

        def fn(s: Session) -> ShippedSeedResult:
            record = s.scalar(
                select(ShippedAsset)
                .where(ShippedAsset.kind == "recipe", ShippedAsset.asset == asset)
                .order_by(ShippedAsset.id.desc())
            )
            now = utcnow()
            if record is not None:
                status, version = "present", self._version(s, record.version_id)
            else:
                if s.scalar(select(Recipe.id).where(Recipe.name == name, Recipe.deleted_at.is_(None))):
                    return ShippedSeedResult(
                        asset, name, "name-taken", None, (), tuple(f"{w.asset}: not added" for w in weights)
                    )
                recipe = Recipe(name=name, created_at=now)
                s.add(recipe)
                s.flush()
                version = self._append_version(s, recipe, yaml_text, note, None)
                s.add(
                    ShippedAsset(
                        kind="recipe", asset=asset, sha256=sha256, version_id=version.id, seeded_at=now
                    )
                )
                status = "seeded"
            added: list[int] = []
            skipped: list[str] = []
            for w in weights:
                done = s.scalar(
                    select(ShippedAsset).where(
                        ShippedAsset.kind == "weights",
                        ShippedAsset.asset == w.asset,
                        ShippedAsset.sha256 == w.sha256,
                    )
                )
                if done is not None:
                    run = s.get(TrainingRun, done.training_run_id) if done.training_run_id else None
                    if (
                        run is not None
                        and run.weights_path != w.path
                        and not Path(run.weights_path or "").is_file()
                    ):
                        run.weights_path, run.updated_at = w.path, now
                    continue
                if version.yaml_text != yaml_text:
                    skipped.append(f"{w.asset}: trained for other text than the seeded version of {name!r}")
                    continue
                run = TrainingRun(
                    version_id=version.id,
                    status="completed",
                    config=dict(w.config),
                    metrics=dict(w.metrics),
                    loss_curve=list(w.loss_curve),
                    weights_path=w.path,
                    created_at=now,
                    updated_at=now,
                    finished_at=now,
                    origin="shipped",
                )
                s.add(run)
                s.flush()
                s.add(
                    ShippedAsset(
                        kind="weights",
                        asset=w.asset,
                        sha256=w.sha256,
                        version_id=version.id,
                        training_run_id=run.id,
                        seeded_at=now,
                    )
                )
                added.append(run.id)
            s.flush()
            return ShippedSeedResult(asset, name, status, version.id, tuple(added), tuple(skipped))

        return self._write(fn)

    # -- evaluations ---------------------------------------------------------------------------------

    def add_evaluation(
        self, version_id: int, results: dict[str, Any], *, training_run_id: int | None = None, name: str = ""
    ) -> EvaluationInfo:
        """Store evaluation results of a version, optionally of the weights one of its training runs produced."""
        results = _check_json(dict(results), "evaluation results")
        name = name.strip() if name else ""
        if len(name) > NAME_MAX:
            raise InputTooLongError(f"Evaluation names are at most {NAME_MAX} characters.")

        def fn(s: Session) -> EvaluationInfo:
            self._version(s, version_id)
            if training_run_id is not None:
                t = s.get(TrainingRun, training_run_id)
                if t is None:
                    raise NotFoundError(f"There is no training run with id {training_run_id}.")
                if t.version_id != version_id:
                    raise StorageError(f"Training run {training_run_id} belongs to another recipe version.")
            e = Evaluation(
                version_id=version_id,
                training_run_id=training_run_id,
                name=name,
                results=results,
                created_at=utcnow(),
            )
            s.add(e)
            s.flush()
            return _evaluation_info(e)

        return self._write(fn)

    def get_evaluation(self, evaluation_id: int) -> EvaluationInfo:
        def fn(s: Session) -> EvaluationInfo:
            e = s.get(Evaluation, evaluation_id)
            if e is None:
                raise NotFoundError(f"There is no evaluation with id {evaluation_id}.")
            return _evaluation_info(e)

        return self._read(fn)

    def list_evaluations(
        self,
        *,
        recipe_id: int | None = None,
        version_id: int | None = None,
        training_run_id: int | None = None,
        limit: int | None = 100,
    ) -> list[EvaluationInfo]:
        """Evaluations, newest first."""

        def fn(s: Session) -> list[EvaluationInfo]:
            stmt = select(Evaluation).join(RecipeVersion, RecipeVersion.id == Evaluation.version_id)
            if recipe_id is not None:
                stmt = stmt.where(RecipeVersion.recipe_id == recipe_id)
            if version_id is not None:
                stmt = stmt.where(Evaluation.version_id == version_id)
            if training_run_id is not None:
                stmt = stmt.where(Evaluation.training_run_id == training_run_id)
            return [_evaluation_info(e) for e in s.scalars(stmt.order_by(Evaluation.id.desc()).limit(limit))]

        return self._read(fn)

    # -- whole database ------------------------------------------------------------------------------

    def _sqlite_file(self, action: str) -> Path:
        path = sqlite_path(self.url)
        if path is None:
            raise StorageError(f"{action} needs a SQLite database file; this repository uses {self.url!r}.")
        return path

    def backup(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """A consistent copy of the whole database (SQLite online backup API; safe while others write)."""
        self._sqlite_file("Backup")
        dest = Path(path).expanduser()
        if dest.exists() and not overwrite:
            raise StorageError(f"{dest} already exists; choose another file or pass overwrite=True.")

        self._call(lambda: _atomic_write(dest, lambda tmp: copy_sqlite(self.engine, tmp)))
        return dest

    def export_json(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Every row of every table as JSON (datetimes as ISO 8601 UTC), readable without Mango."""
        dest = Path(path).expanduser()
        if dest.exists() and not overwrite:
            raise StorageError(f"{dest} already exists; choose another file or pass overwrite=True.")

        def fn(s: Session) -> dict[str, Any]:
            tables: dict[str, list[dict[str, Any]]] = {}
            for table in Base.metadata.sorted_tables:
                rows = s.execute(select(table).order_by(*table.primary_key.columns)).mappings()
                tables[table.name] = [
                    {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
                    for row in rows
                ]
            return tables

        data = {
            "format": EXPORT_FORMAT,
            "format_version": 1,
            "schema_revision": self.schema_revision(),
            "exported_at": datetime.now(timezone.utc).isoformat(),
            "tables": self._read(fn),
        }
        _atomic_write(
            dest, lambda tmp: tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        )
        return dest

    def restore(self, path: str | os.PathLike[str]) -> Path | None:
        """Replace the whole database with a backup (a SQLite file from `backup`) or an export (JSON from
        `export_json`). The current contents are first saved by `backup` next to the database file; that
        file's path is returned (None for in-memory databases). Older schemas are upgraded after restoring."""
        src = Path(path).expanduser()
        if not src.is_file():
            raise NotFoundError(f"There is no backup file {src}.")
        with open(src, "rb") as f:
            is_sqlite = f.read(16) == b"SQLite format 3\x00"
        if not is_sqlite:
            try:
                data = json.loads(src.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise StorageError(f"{src} is neither a SQLite backup nor a JSON export: {e}") from e
            if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
                raise StorageError(f'{src} is not a Mango export (no "format": "{EXPORT_FORMAT}").')
        else:
            self._check_sqlite_backup(src)

        safety = None
        live = sqlite_path(self.url)
        if live is not None and live.exists():
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            safety = self.backup(live.with_name(f"{live.name}.pre-restore-{stamp}.bak"))
        if is_sqlite:
            self._restore_sqlite(src)
        else:
            self._restore_json(data)
        self.engine.dispose()
        self._call(lambda: upgrade(self.engine, backup_before=False))
        return safety

    @staticmethod
    def _check_sqlite_backup(src: Path) -> None:
        try:
            conn = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
            try:
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
                has_schema = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='alembic_version'"
                ).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise StorageError(f"{src} is not a readable SQLite database: {e}") from e
        if ok != "ok":
            raise StorageError(f"{src} is damaged (integrity check: {ok}); nothing was restored.")
        if not has_schema:
            raise StorageError(f"{src} is not a Mango database; nothing was restored.")

    def _restore_sqlite(self, src: Path) -> None:
        def once() -> None:
            source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
            raw = self.engine.raw_connection()
            try:
                source.backup(raw.driver_connection)  # type: ignore[arg-type]
            finally:
                raw.close()
                source.close()

        self._call(once)

    def _restore_json(self, data: dict[str, Any]) -> None:
        revision = data.get("schema_revision")
        if revision is not None and revision not in known_revisions():
            raise StorageError(
                f"This export comes from a newer Mango (schema {revision}); upgrade Mango first."
            )
        tables = data.get("tables") or {}
        unknown = set(tables) - set(Base.metadata.tables)
        if unknown:
            raise StorageError(
                f"This export has tables this Mango does not know: {', '.join(sorted(unknown))}."
            )

        def fn(s: Session) -> None:
            # Versions point at parent versions: check foreign keys at commit, not row by row.
            s.connection().exec_driver_sql("PRAGMA defer_foreign_keys = ON")
            for table in reversed(Base.metadata.sorted_tables):
                s.execute(delete(table))
            for table in Base.metadata.sorted_tables:
                rows = tables.get(table.name) or []
                dt_cols = {c.name for c in table.columns if isinstance(c.type, UTCDateTime)}
                fixed = [
                    {
                        k: datetime.fromisoformat(v) if k in dt_cols and isinstance(v, str) else v
                        for k, v in row.items()
                        if k in table.columns
                    }
                    for row in rows
                ]
                if fixed:
                    s.execute(table.insert(), fixed)

        try:
            self._write(fn)
        except StorageError:
            raise
        except Exception as e:  # a malformed export: nothing was changed (the transaction rolled back)
            raise StorageError(f"The export could not be restored: {e}") from e

    def schema_revision(self) -> str | None:
        return self._call(lambda: current_revision(self.engine))

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check`: "ok" when the file is sound."""

        def fn(s: Session) -> str:
            return str(s.connection().exec_driver_sql("PRAGMA integrity_check").scalar())

        return self._read(fn)


# ---------------------------------------------------------------------------------------------- process-wide

_repos: dict[str, Repository] = {}
_repos_lock = threading.Lock()


def get_repository(url: str | None = None) -> Repository:
    """The process-wide repository for `url` (default: `MANGO_DB_URL` or the data folder), opened and migrated
    on first use."""
    key = resolve_url(url)
    with _repos_lock:
        repo = _repos.get(key)
        if repo is None:
            repo = _repos[key] = Repository(key)
        return repo
