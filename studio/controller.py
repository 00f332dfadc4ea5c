"""The work behind the studio's tabs: what a callback does besides reading its components and filling others.
Each tab's `create_*_tab()` lays out and wires its components and calls these methods; the methods call the
engine (models, plans, generation, training) and the repository, and return plain data. The rules they apply
(recipes, training, evaluation, export) are `mol`'s."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mol
from mol.errors import RecipeError
from mol.export.mergekit import export_mergekit
from mol.recipe import ALIAS_RE
from studio import draft_recipe as dr
from studio.db import VersionConflictError
from studio.engine import BUILTIN_CORPORA, TRAIN_SETTINGS, PlanReport, StudioEngine, TrainingProgress
from studio.errors import InputError, recipe_text, record_id, user_message
from studio.errors import text as text_arg
from studio.limits import Limits

# The Train tab's own defaults where `mol.TrainConfig` has none that suit a first run in a browser: a bound on
# each domain's tokens and no time limit (0). Everything else starts at TrainConfig's defaults.
UI_TRAIN_OVERRIDES = {"max_tokens": 200_000, "max_seconds": 0}


def train_defaults() -> dict[str, Any]:
    """The Train tab's starting values: `mol.TrainConfig`'s defaults for every setting the tab offers."""
    config = mol.TrainConfig()
    defaults = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in TRAIN_SETTINGS
    }
    return {**defaults, **UI_TRAIN_OVERRIDES}


def fmt_time(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


def checked_yaml(value: object, limit: int = Limits.recipe_chars) -> str:
    """Recipe YAML from a request: text, at most `limit` characters (the studio's `limits.recipe_chars`), and
    no alias bomb."""
    return recipe_text(value, limit)


def save_recipe(engine: StudioEngine, yaml_text: str, note: str = "", based_on: dict | None = None):
    """Store a recipe as a new version (a new recipe when no live one has its name). Returns the version and
    a warning when someone saved the same recipe meanwhile (both versions are kept)."""
    recipe = engine.recipe_from_yaml(checked_yaml(yaml_text, engine.config.limits.recipe_chars))
    note = text_arg(note, "The version note", 100_000)
    base = None  # the version the board was opened from (the tab's own state), if any
    if isinstance(based_on, dict) and all(isinstance(based_on.get(k), int) for k in ("recipe_id", "version")):
        base = (based_on["recipe_id"], based_on["version"])
    try:  # find-or-create and append in one transaction: parallel first saves of a name all land in one recipe
        return engine.repo.save_by_name(recipe.name, recipe.to_yaml(), note, based_on=base), None
    except VersionConflictError as exc:
        return engine.repo.get_version(exc.recipe_id, exc.version), str(exc)


def edit_yaml(yaml_text: str, op, *args, limit: int = Limits.recipe_chars) -> str:
    """Apply one board operation to recipe YAML (at most `limit` characters) and return the new, validated
    YAML."""
    recipe, _ = dr.parse_recipe_text(checked_yaml(yaml_text, limit))
    slots = op(dr.slots_of(recipe), *args)
    draft = dr.draft_recipe(
        recipe.name, recipe.base, recipe.adapter.type, recipe.adapter.rank, recipe.models, slots
    )
    draft["models"] = dict(recipe.models)  # the API caller listed them: keep the unused ones too
    return dr.Recipe.from_dict(draft).to_yaml()


def uploaded_paths(files: Any) -> list[str]:
    return [f if isinstance(f, str) else f.name for f in files or []]


def _short(text: str, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


class StudioController:
    """The tabs' actions over one engine."""

    def __init__(self, engine: StudioEngine):
        self.engine = engine

    @property
    def repo(self):
        return self.engine.repo

    # ---- the workspace: the models this session can use ------------------------------------------------
    def card_or_error(self, alias: str, ref: str) -> dict:
        try:
            return self.engine.model_card(alias, ref)
        except Exception as exc:
            return {"alias": alias, "ref": ref, "error": user_message(exc)}

    def initial_workspace(self) -> list[dict]:
        return [self.card_or_error(a, r) for a, r in self.engine.embedded_models().items()]

    def merge_models(self, workspace: list[dict], models: dict[str, str]) -> list[dict]:
        """The workspace with `models` (alias -> ref) present: new aliases are added, an alias bound to another
        reference is re-bound (the recipe being opened decides what its aliases mean)."""
        out = list(workspace or [])
        index = {c["alias"]: i for i, c in enumerate(out)}
        for alias, ref in models.items():
            if alias in index and out[index[alias]]["ref"] == ref:
                continue
            card = self.card_or_error(alias, ref)
            if alias in index:
                out[index[alias]] = card
            else:
                out.append(card)
        return out

    def add_model(self, workspace: list[dict], ref: str, alias: str) -> tuple[list[dict], dict]:
        """Validate a model (config, weights headers, tokenizer) and add its card to the workspace."""
        ref = text_arg(ref, "The model reference", 1000).strip()
        alias = text_arg(alias, "The alias", 200).strip()
        if not ref:
            raise RecipeError("Give a Hub id (org/name) or a local model folder.")
        workspace = list(workspace or [])
        taken = {c["alias"]: c["ref"] for c in workspace}
        if ref in taken.values():
            raise RecipeError(
                f"'{ref}' is already in the list as '{next(a for a, r in taken.items() if r == ref)}'."
            )
        if alias and not ALIAS_RE.match(alias):
            raise RecipeError(
                f"Alias '{alias}' is not allowed: use letters, digits, '_', '-', '.', starting with a letter."
            )
        if alias in taken:
            raise RecipeError(f"Alias '{alias}' is taken by {taken[alias]}; choose another.")
        alias = alias or dr.alias_for(ref, taken)
        card = self.engine.model_card(alias, ref)
        return [*workspace, card], card

    # ---- recipes -------------------------------------------------------------------------------------
    def check_draft(self, draft: dict, slots: list[dict]) -> PlanReport | None:
        """The plan report of a draft (None: an empty board)."""
        return self.engine.check(draft) if slots else None

    def save_recipe(self, yaml_text: str, note: str = "", based_on: dict | None = None):
        return save_recipe(self.engine, yaml_text, note, based_on)

    def version_rows(self, include_deleted: bool = False) -> list[list]:
        rows = []
        for r in self.repo.list_recipes(deleted=None if include_deleted else False):
            for v in reversed(self.repo.list_versions(r.id)):
                rows.append(
                    [
                        r.name,
                        v.number,
                        fmt_time(v.created_at),
                        v.note,
                        v.id,
                        "deleted" if r.deleted else "saved",
                    ]
                )
        return rows

    @staticmethod
    def version_choices(rows: list[list]) -> list[tuple[str, int]]:
        return [
            (
                f"{r[0]} v{r[1]}"
                + (f" — {r[3][:40]}" if r[3] else "")
                + (" (deleted)" if r[5] == "deleted" else ""),
                r[4],
            )
            for r in rows
        ]

    def open_version(self, version_id: Any):
        """A saved version and its recipe."""
        if version_id is None:
            raise RecipeError("Pick a version to open.")
        v = self.repo.get_version_by_id(int(version_id))
        return v, self.engine.recipe_from_yaml(v.yaml_text)

    def duplicate_version(self, version_id: Any):
        if version_id is None:
            raise RecipeError("Pick a version to duplicate.")
        return self.repo.duplicate_recipe(int(version_id))

    def delete_recipe_of(self, version_id: Any):
        if version_id is None:
            raise RecipeError("Pick a version of the recipe to delete.")
        v = self.repo.get_version_by_id(int(version_id))
        self.repo.delete_recipe(v.recipe_id)
        return v

    def restore_recipe_of(self, version_id: Any):
        if version_id is None:
            raise RecipeError("Pick a version of the deleted recipe to restore.")
        v = self.repo.get_version_by_id(int(version_id))
        return self.repo.restore_recipe(v.recipe_id)

    def compare(self, old_id: Any, new_id: Any):
        if old_id is None or new_id is None:
            raise RecipeError("Pick two versions: 'Version' and 'Compare with'.")
        return self.repo.compare_versions(int(old_id), int(new_id))

    def import_text(self, text: Any):
        """A recipe (and notes on what a mergekit import does differently) from YAML text."""
        return dr.parse_recipe_text(checked_yaml(text or "", self.engine.config.limits.recipe_chars))

    def read_recipe_upload(self, file: Any) -> str:
        """An uploaded recipe file's text: UTF-8 only, and no larger than a recipe may be."""
        path = file if isinstance(file, str) else file.name
        return self.engine.read_upload(path, 4 * self.engine.config.limits.recipe_chars)

    def example_recipe(self, filename: Any):
        if not filename:
            raise RecipeError("Pick an example recipe.")
        return self.engine.recipe_from_file(self.engine.config.recipes_dir / Path(filename).name)

    def example_names(self) -> list[str]:
        folder = self.engine.config.recipes_dir
        return sorted(p.name for p in folder.glob("*.y*ml")) if folder.is_dir() else []

    def export_draft(self, draft: dict, fmt: str = "mango") -> Path:
        """The draft as a recipe file to download: Mango YAML, or mergekit passthrough YAML."""
        recipe = self.engine.recipe_from_dict(draft)
        text = export_mergekit(self.engine.plan(recipe)) if fmt == "mergekit" else recipe.to_yaml()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in draft["name"]) or "recipe"
        suffix = ".mergekit.yaml" if fmt == "mergekit" else ".yaml"
        path = Path(tempfile.mkdtemp(prefix="mango-export-")) / f"{safe}{suffix}"
        path.write_text(text, encoding="utf-8")
        return path

    @staticmethod
    def loaded_version_id(loaded: Any) -> int:
        if not loaded or not loaded.get("version_id"):
            raise RecipeError("Save the recipe, or open a saved version, before exporting it.")
        return int(loaded["version_id"])

    def export_model(self, fmt: str, run_id: Any, loaded: Any) -> Path:
        return self.engine.export_version(
            self.loaded_version_id(loaded), fmt, int(run_id) if run_id else None
        )

    def push_model(self, repo_id: str, token: str, run_id: Any, loaded: Any) -> str:
        return self.engine.push_version(
            self.loaded_version_id(loaded), repo_id, token, int(run_id) if run_id else None
        )

    # ---- versions to run, and their weights ----------------------------------------------------------
    def run_versions(self) -> list[tuple[str, int]]:
        """Every version of every live recipe, newest first (what the Playground, Train and Evaluate run)."""
        out = []
        for r in self.repo.list_recipes():
            for v in reversed(self.repo.list_versions(r.id)):
                out.append((f"{r.name} v{v.number}" + (f" — {v.note[:40]}" if v.note else ""), v.id))
        return out

    def weight_choices(self, version_id: int | None) -> list[tuple[str, int]]:
        """The weights a version can run with: as built (0), or those of one of its finished training runs."""
        choices = [("as built (untrained adapters and routers)", 0)]
        try:
            version_id = record_id(version_id, "recipe version") if version_id is not None else None
        except InputError:  # not a version: nothing trained for it
            version_id = None
        if version_id is None:
            return choices
        for t in self.repo.list_training_runs(version_id=version_id):
            if t.status == "completed" and t.weights_path:
                loss = t.metrics.get("final_loss")
                choices.append(
                    (f"training run #{t.id}" + (f" (loss {loss:.3f})" if loss is not None else ""), t.id)
                )
        return choices

    # ---- playground ----------------------------------------------------------------------------------
    def run_rows(self, limit: int = 100) -> list[list]:
        return [
            [
                r.id,
                fmt_time(r.created_at),
                r.recipe_name,
                r.version_number,
                _short(r.prompt),
                _short(r.output_text),
            ]
            for r in self.repo.list_runs(limit=limit)
        ]

    @staticmethod
    def run_choices(rows: list[list]) -> list[tuple[str, int]]:
        return [(f"#{r[0]} {r[2]} v{r[3]}: {r[4][:40]}", r[0]) for r in rows]

    def recipe_sources(self, version_id: int | None) -> dict[str, str]:
        if version_id is None:
            return {}
        v = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        return dict(self.engine.recipe_from_yaml(v.yaml_text).models)

    def run_sources(self, version_id: Any, chosen: list[str], prompt: str, settings: dict) -> dict[str, str]:
        """The same prompt through each chosen source model of a version, alone."""
        refs = self.recipe_sources(version_id)
        if not chosen:
            raise RecipeError("Tick at least one source model.")
        return {a: self.engine.run_source(a, refs[a], prompt or "", settings) for a in chosen if a in refs}

    def get_run(self, run_id: Any):
        if run_id is None:
            raise RecipeError("Pick a run to open.")
        return self.repo.get_run(record_id(run_id, "run"))

    # ---- training and evaluation ---------------------------------------------------------------------
    def training_rows(self, limit: int = 50) -> list[list]:
        rows = []
        names = {r.id: r.name for r in self.repo.list_recipes(deleted=None)}
        for t in self.repo.list_training_runs(limit=limit):
            final = t.loss_curve[-1]["loss"] if t.loss_curve else None
            rows.append(
                [
                    t.id,
                    f"{names.get(t.recipe_id, '?')} v{t.version_number}",
                    t.status,
                    len(t.loss_curve),
                    "" if final is None else f"{final:.4f}",
                    fmt_time(t.created_at),
                ]
            )
        return rows

    def train(
        self, version_id: Any, corpora: list[str], files: Any, settings: dict[str, Any]
    ) -> Iterator[TrainingProgress]:
        """Train a version on the chosen corpora and uploaded files with the tab's settings (0 or empty for
        max_tokens and max_seconds: no bound): the request is checked now, the returned iterator trains."""
        if version_id is None:
            raise RecipeError("Pick a saved recipe version first (save one in the Recipe tab).")
        data = self.engine.datasets(corpora, uploaded_paths(files), "train")
        s = dict(settings)
        for name in ("max_tokens", "max_seconds"):
            s[name] = s.get(name) or None
        return self.engine.train_version(version_id, data, s)

    def evaluation_rows(self, limit: int = 50) -> list[list]:
        rows = []
        for e in self.repo.list_evaluations(limit=limit):
            fused = next((r for r in e.results.get("rows", []) if r.get("kind") == "fused"), None)
            ppl = ", ".join(f"{d} {v['perplexity']:.2f}" for d, v in (fused or {}).get("domains", {}).items())
            rows.append([e.id, e.name, fmt_time(e.created_at), ppl])
        return rows

    def evaluate(
        self,
        version_id: Any,
        weights_id: Any,
        corpora: list[str],
        files: Any,
        seq_len: Any,
        max_tokens: Any,
        sources: Any,
        on_progress=None,
    ):
        if version_id is None:
            raise RecipeError("Pick a saved recipe version first (save one in the Recipe tab).")
        data = self.engine.datasets(corpora, uploaded_paths(files), "test")
        return self.engine.evaluate_version(
            version_id,
            data,
            weights_id or None,
            bool(sources),
            int(seq_len),
            int(max_tokens) if max_tokens else None,
            on_progress=on_progress,
        )


__all__ = [
    "BUILTIN_CORPORA",
    "StudioController",
    "checked_yaml",
    "edit_yaml",
    "save_recipe",
    "train_defaults",
]
