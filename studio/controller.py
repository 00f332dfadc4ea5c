"""The work behind the studio's tabs: what a callback does besides reading its components and filling others.
Each tab's `create_*_tab()` lays out and wires its components and calls these methods; the methods call the
engine (models, plans, generation, training) and the repository, and return plain data. The rules they apply
(recipes, training, evaluation, export) are `mol`'s."""

from __future__ import annotations

import dataclasses
import html
import json
import tempfile
from pathlib import Path
from typing import Any

import mol
from mol.errors import RecipeError
from mol.export.mergekit import export_mergekit
from mol.recipe import ALIAS_RE, parse_yaml
from mol.sources import load_source
from studio import draft_recipe as dr
from studio.db import VersionConflictError
from studio.engine import (
    BUILTIN_CORPORA,
    LOSS_SMOOTHING,
    REPO_ROOT,
    TRAIN_SETTINGS,
    PlanReport,
    StudioEngine,
    TrainingProgress,
    smoothed_final_loss,
)
from studio.errors import InputError, recipe_text, record_id, user_message
from studio.errors import text as text_arg
from studio.jobs import Job
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


def edit_lanes_yaml(yaml_text: str, op, *args, limit: int = Limits.recipe_chars) -> str:
    """Apply one lanes operation of the board (studio.draft_recipe: add_lane, add_stitch, set_mixture, ...) to
    recipe YAML and return the new, validated YAML. A single-stream recipe gets lanes from its models first."""
    recipe, _ = dr.parse_recipe_text(checked_yaml(yaml_text, limit))
    part = dr.lanes_of(recipe) or dr.new_lanes([])
    draft = dr.draft_lanes_recipe(
        recipe.name, recipe.base, recipe.adapter.type, recipe.adapter.rank, recipe.models, op(part, *args)
    )
    draft["models"] = dict(recipe.models)  # the API caller listed them: keep the unused ones too
    return dr.Recipe.from_dict(draft).to_yaml()


def readme_summary(text: str, limit: int = 240) -> str:
    """A model card's first paragraph of prose (front matter and headings skipped), up to its first colon: for
    the demo models, what each is good at ("Llama-family prose specialist (Shakespeare only)")."""
    body = text
    if body.startswith("---"):
        end = body.find("\n---", 3)
        body = body[end + 4 :] if end >= 0 else ""
    for para in body.split("\n\n"):
        para = " ".join(para.split())
        if para and not para.startswith(("#", "-", "|", "```", "!", "<")):
            head = para.split(": ", 1)[0]
            return head if len(head) <= limit else head[: limit - 1] + "…"
    return ""


def run_status(t) -> str:
    """A training run's status for people: a stopped run says how far it got ("stopped at step 340 of 2000")."""
    at, planned = t.metrics.get("stopped_at"), t.metrics.get("planned_steps")
    if t.status == "completed" and at is not None:
        return f"stopped at step {at} of {planned}" if planned else f"stopped at step {at}"
    return t.status


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
            return self.named_tokenizer(self.engine.model_card(alias, ref))
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
        card = self.named_tokenizer(self.engine.model_card(alias, ref))
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
        older, newer = sorted((int(old_id), int(new_id)))  # always older -> newer: an addition reads "added"
        return self.repo.compare_versions(older, newer)

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

    # ---- the recipe board: guardrails, the drawn model, drafts kept in the browser -------------------
    # (one block: the Recipe tab's issue work; the rules stay mol's: every check below is a mol plan)
    def check_draft_with_plan(self, draft: dict, slots: list[dict]):
        """The plan report of a draft and its plan when it has one ((None, None): an empty board)."""
        return self.engine.check_with_plan(draft) if slots else (None, None)

    def draft_diagram(self, draft: dict | None, workspace: list[dict], plan: Any = None) -> str:
        """The fused model the board describes, drawn (studio.diagram): from the plan when there is one (its
        widths, families and adapters), else from the draft and the workspace's cards."""
        from studio.diagram import plan_info, recipe_svg

        if not draft or not (draft.get("slots") or draft.get("lanes")):
            return '<div class="recipe-diagram empty">The fused model is drawn here as you add slots.</div>'
        colors = dr.model_colors([c["alias"] for c in workspace or []] + list(draft.get("models") or {}))
        cards = {c["alias"]: c for c in workspace or [] if "error" not in c}
        if plan is not None:
            info = plan_info(plan)
        else:
            info = {
                "widths": {a: int(c["width"]) for a, c in cards.items() if c.get("width")},
                "families": {a: str(c.get("family") or "") for a, c in cards.items()},
            }
            if draft.get("lanes"):  # a lane without slots runs its base's layers: their number from the cards
                info["layers"] = {a: int(c["layers"]) for a, c in cards.items() if c.get("layers")}
        try:
            svg = recipe_svg(draft, colors=colors, title=draft.get("name") or None, **info)
        except Exception as exc:  # a drawing bug must not take the board's validation with it
            return f'<div class="recipe-diagram empty">{html.escape(user_message(exc))}</div>'
        return f'<div class="recipe-diagram">{svg}</div>'

    def join_marks(self, workspace: list[dict], base: str | None) -> dict[str, str]:
        """alias -> why that model cannot join a recipe on `base` (models that can are absent): its card's
        error, or what mol's plan says of the base with one block of it (another tokenizer, say). Cached per
        (base, model) pair of references: plans read configs and headers, and the board asks on every edit."""
        cards = {c["alias"]: c for c in workspace or []}
        out = {a: "cannot be read: " + c["error"] for a, c in cards.items() if "error" in c}
        b = cards.get(base or "")
        if b is None or "error" in b:
            return out
        for alias, c in cards.items():
            if alias == base or "error" in c:
                continue
            key = (base, b["ref"], alias, c["ref"])
            if key not in self._join_cache:
                probe = {
                    "name": "join-check",
                    "base": base,
                    "models": {base: b["ref"], alias: c["ref"]},
                    "slots": [f"{base}:0", f"{alias}:0"],
                }
                report = self.engine.check(probe)
                self._join_cache[key] = None if report.ok else report.error
            if self._join_cache[key]:
                out[alias] = self._join_cache[key]
        return out

    @property
    def _join_cache(self) -> dict:
        return self.__dict__.setdefault("_join_results", {})

    def version_runnable(self, version: Any) -> bool:
        """Whether a saved version plans (so it can be built, run, trained, evaluated). Versions never change,
        so each is planned once; one that fails (saved through the API, or its models changed) is not offered."""
        cache = self.__dict__.setdefault("_runnable", {})
        if version.id not in cache:
            try:
                recipe = self.engine.recipe_from_yaml(version.yaml_text)
                cache[version.id] = self.engine.check(recipe.to_dict()).ok
            except Exception:
                cache[version.id] = False
        return cache[version.id]

    def name_taken(self, name: Any, loaded: Any):
        """The other live recipe a save under `name` would add a version to (None: the name is free or is the
        open recipe's own): the board asks before saving into it."""
        recipe_id = loaded.get("recipe_id") if isinstance(loaded, dict) else None
        return self.repo.name_taken_by_other(
            (name or "").strip() if isinstance(name, str) else "",
            recipe_id if isinstance(recipe_id, int) else None,
        )

    def import_reusing_aliases(self, text: Any, workspace: list[dict]):
        """`import_text`, and a mergekit config's models that the workspace already has keep their workspace
        alias (mergekit names models by path; the importer makes up aliases), with a note for each."""
        recipe, notes = self.import_text(text)
        data = parse_yaml(checked_yaml(text or "", self.engine.config.limits.recipe_chars))
        if not (isinstance(data, dict) and "slices" in data):
            return recipe, notes
        known = {self._ref_key(c["ref"]): c["alias"] for c in workspace or [] if c.get("ref")}
        rename = {}
        for alias, ref in recipe.models.items():
            have = known.get(self._ref_key(ref))
            if have and have != alias and have not in recipe.models:
                rename[alias] = have
        if not rename:
            return recipe, notes
        d = recipe.to_dict()
        d["models"] = {rename.get(a, a): r for a, r in d["models"].items()}
        d["base"] = rename.get(d["base"], d["base"])
        for slot in d["slots"]:
            slot["experts"] = [
                f"{rename.get(e.split(':', 1)[0], e.split(':', 1)[0])}:{e.split(':', 1)[1]}"
                if isinstance(e, str) and ":" in e
                else e
                for e in slot["experts"]
            ]
        notes = [
            *notes,
            *(f"'{a}' is the loaded model '{b}': it keeps that alias." for a, b in rename.items()),
        ]
        return self.engine.recipe_from_dict(d), notes

    @staticmethod
    def _ref_key(ref: str) -> str:
        from studio.engine import REPO_ROOT

        local = Path(ref) if Path(ref).is_absolute() else REPO_ROOT / ref
        try:
            return str(local.resolve()) if local.exists() else ref
        except OSError:
            return ref

    def _is_saved(self, name, base, adapter, rank, models, slots, lanes=None) -> bool:
        """Whether a board draft is, word for word, the latest version of the recipe it names."""
        try:
            board = {"slots": slots, **(lanes or {})}
            recipe = self.engine.recipe_from_dict(dr.board_draft(name, base, adapter, rank, models, board))
            found = self.repo.find_recipe(recipe.name)
            return found is not None and self.repo.get_version(found.id).yaml_text == recipe.to_yaml()
        except Exception:
            return False

    def saved_version(self, loaded: Any):
        """The saved version the board is editing (what every export takes)."""
        return self.repo.get_version_by_id(self.loaded_version_id(loaded))

    def export_saved_yaml(self, loaded: Any, fmt: str = "mango"):
        """The saved version being edited as a recipe file (Mango YAML or mergekit passthrough); and it."""
        v = self.saved_version(loaded)
        recipe = self.engine.recipe_from_yaml(v.yaml_text)
        text = export_mergekit(self.engine.plan(recipe)) if fmt == "mergekit" else recipe.to_yaml()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in v.recipe_name) or "recipe"
        suffix = ".mergekit.yaml" if fmt == "mergekit" else ".yaml"
        path = Path(tempfile.mkdtemp(prefix="mango-export-")) / f"{safe}-v{v.number}{suffix}"
        path.write_text(text, encoding="utf-8")
        return path, v

    def restore_draft(self, stored: Any, workspace: list[dict]) -> dict | None:
        """A board draft kept in the browser, checked (it comes from the client): name, base, adapter, rank,
        slots, the models it uses (brought into the workspace under the server's policy) and the saved version
        it was opened from (kept only when that version exists and matches). None: nothing usable."""
        if not isinstance(stored, dict):
            return None
        try:
            slots = dr.board_slots({"slots": stored.get("slots")})
            part = stored.get("lanes")  # a lanes board: {"lanes", "stitches", "mixture"}
            lanes = dr.board_lanes(part) if isinstance(part, dict) else None
            name = text_arg(stored.get("name") or "", "The recipe name", 10_000)
            models = stored.get("models") or {}
            if not isinstance(models, dict) or len(models) > 64:
                return None
            models = {
                a: text_arg(r, "The model reference", 1000)
                for a, r in models.items()
                if isinstance(a, str) and ALIAS_RE.match(a) and isinstance(r, str)
            }
            adapter = stored.get("adapter")
            adapter = adapter if adapter in mol.recipe.ADAPTER_TYPES else mol.recipe.AdapterSpec.type
            rank = stored.get("rank")
            rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
            base = stored.get("base") if isinstance(stored.get("base"), str) else None
        except Exception:
            return None
        if not slots and not (lanes and lanes["lanes"]):
            return None
        if self._is_saved(name, base, adapter, rank, models, slots, lanes):
            return None  # kept before its save completed: nothing unsaved in it
        loaded = None
        saved = stored.get("loaded")
        if isinstance(saved, dict) and isinstance(saved.get("version_id"), int):
            try:
                v = self.repo.get_version_by_id(saved["version_id"])
                if v.recipe_id == saved.get("recipe_id") and v.number == saved.get("version"):
                    loaded = {"recipe_id": v.recipe_id, "version": v.number, "version_id": v.id}
            except Exception:
                loaded = None
        workspace = self.merge_models(workspace, {a: r for a, r in models.items()})
        return {
            "name": name,
            "base": base,
            "adapter": adapter,
            "rank": rank,
            "slots": [] if lanes else slots,
            "lanes": lanes,
            "workspace": workspace,
            "loaded": loaded,
        }

    # ---- versions to run, and their weights ----------------------------------------------------------
    def run_versions(self) -> list[tuple[str, int]]:
        """Every version of every live recipe, newest first (what the Playground, Train and Evaluate run)."""
        out = []
        for r in self.repo.list_recipes():
            for v in reversed(self.repo.list_versions(r.id)):
                if not self.version_runnable(v):  # a recipe whose plan fails is never offered to run
                    continue
                out.append((f"{r.name} v{v.number}" + (f" — {v.note[:40]}" if v.note else ""), v.id))
        return out

    AS_BUILT = ("as built (untrained adapters and routers)", 0)

    def weight_choices(self, version_id: int | None) -> list[tuple[str, int]]:
        """The weights a version can run with: as built (0), or one of its trained results (a training run's
        or shipped weights), each named by its label ("fused-token v1 · shipped"), never a bare id."""
        try:
            version_id = record_id(version_id, "recipe version") if version_id is not None else None
        except InputError:  # not a version: nothing trained for it
            version_id = None
        if version_id is None:
            return [self.AS_BUILT]
        choices = [self.AS_BUILT]
        # the repository's labels (`trained_result_choices`), with how a run ended and its loss where known
        for r in self.repo.list_trained_results(version_id=version_id):
            t = r.run
            loss = t.metrics.get("final_loss_smoothed", t.metrics.get("final_loss"))
            notes = [run_status(t)] if t.metrics.get("stopped_at") is not None else []
            notes += [f"loss {loss:.3f}"] if isinstance(loss, (int, float)) and not r.shipped else []
            choices.append((r.label + (f" ({', '.join(notes)})" if notes else ""), r.id))
        return choices

    def default_weights(self, version_id: int | None) -> int:
        """What a weight picker selects for a version: its shipped trained weights when it has them (a shipped
        fusion is meant to run trained), else as built (0)."""
        try:
            version_id = record_id(version_id, "recipe version") if version_id is not None else None
        except InputError:
            return 0
        if version_id is None:
            return 0
        shipped = [r for r in self.repo.list_trained_results(version_id=version_id) if r.shipped]
        return shipped[0].id if shipped else 0

    def starting_version(self, choices: list[tuple[str, int]] | None = None) -> int | None:
        """The version the Playground opens on: the best shipped trained fusion (`studio.seed.best_shipped_fusion`)
        unless a version was saved after every shipped one (the user's newest work), else the newest version.
        `choices`: `run_versions()`, if already read."""
        from studio.seed import best_shipped_fusion

        choices = self.run_versions() if choices is None else choices
        ids = [c[1] for c in choices]
        best = best_shipped_fusion(self.repo)
        if best is None or best.version.id not in ids:
            return ids[0] if ids else None
        shipped = {r.version_id for r in self.repo.list_trained_results(shipped=True)}
        seeded = shipped | self.repo.seeded_version_ids()  # a shipped example is nobody's newest work
        mine = [i for i in ids if i not in seeded]
        if not mine:
            return best.version.id
        newest = self.repo.get_version_by_id(mine[0])
        newest_shipped = max(self.repo.get_version_by_id(v).created_at for v in shipped)
        return newest.id if newest.created_at > newest_shipped else best.version.id

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
            final = t.metrics.get("final_loss_smoothed") or smoothed_final_loss(t.loss_curve)
            rows.append(
                [
                    t.id,
                    f"{names.get(t.recipe_id, '?')} v{t.version_number}",
                    run_status(t),
                    len(t.loss_curve),
                    "" if final is None else f"{final:.4f}",
                    fmt_time(t.created_at),
                ]
            )
        return rows

    def evaluation_rows(self, limit: int = 50) -> list[list]:
        rows = []
        for e in self.repo.list_evaluations(limit=limit):
            fused = next((r for r in e.results.get("rows", []) if r.get("kind") == "fused"), None)
            ppl = ", ".join(f"{d} {v['perplexity']:.2f}" for d, v in (fused or {}).get("domains", {}).items())
            rows.append([e.id, e.name, fmt_time(e.created_at), ppl])
        return rows

    # ---- long jobs (Train and Evaluate run in the background: Stop, a queue, re-attach after a reload) ------
    def start_training(
        self, version_id: Any, corpora: list[str], files: Any, settings: dict[str, Any]
    ) -> Job:
        """`train`, as a job: checked now, queued behind the running jobs, stopped with `stop_job`."""
        if version_id is None:
            raise RecipeError("Pick a saved recipe version first (save one in the Recipe tab).")
        data = self.engine.datasets(corpora, uploaded_paths(files), "train")
        s = dict(settings)
        for name in ("max_tokens", "max_seconds"):
            s[name] = s.get(name) or None
        return self.engine.start_training(version_id, data, s)

    def start_evaluation(
        self,
        version_id: Any,
        weights_id: Any,
        corpora: list[str],
        files: Any,
        seq_len: Any,
        max_tokens: Any,
        sources: Any,
    ) -> Job:
        """`evaluate`, as a job."""
        if version_id is None:
            raise RecipeError("Pick a saved recipe version first (save one in the Recipe tab).")
        data = self.engine.datasets(corpora, uploaded_paths(files), "test")
        return self.engine.start_evaluation(
            version_id,
            data,
            record_id(weights_id, "training run") if weights_id else None,
            bool(sources),
            int(seq_len),
            int(max_tokens) if max_tokens else None,
        )

    def stop_job(self, job_id: Any) -> Job | None:
        if job_id is None:
            return None
        return self.engine.jobs.stop(record_id(job_id, "job"))

    def shown_job(self, kind: str, job_id: Any = None) -> Job | None:
        """The job a page shows: the one it started (`job_id`), else, after a reload, the one of `kind` running
        or waiting now (None: none)."""
        job = self.engine.jobs.get(int(job_id)) if isinstance(job_id, int) else None
        return job if job is not None and job.kind == kind else self.engine.jobs.latest(kind)

    @staticmethod
    def job_line(job: Job) -> str:
        """Where a job stands, in words."""
        what = "Training" if job.kind == "train" else "Evaluation"
        name = f"{what} of {job.label}" + (
            f" (training run #{job.training_run_id})" if job.training_run_id else ""
        )
        if job.state == "queued":
            return f"{name}: waiting: {job.ahead} job{'' if job.ahead == 1 else 's'} ahead."
        if job.state == "running":
            if job.stop_requested():
                return f"{name}: stopping after the current step…"
            unit = "step" if job.kind == "train" else "score"
            progress = f"{unit} {job.step} of {job.steps}" if job.step else "preparing"
            return f"{name}: {progress}" + (f" ({job.detail})" if job.detail and job.step == 0 else "") + "."
        if job.state == "failed":
            return job.error or f"{name} failed."
        return f"{name} {job.state}."

    @staticmethod
    def training_summary(p: TrainingProgress) -> str:
        """The line a finished or stopped training ends with; its final loss is the smoothed curve's last value."""
        loss = p.metrics.get("final_loss_smoothed")
        loss_text = (
            f"final loss {loss:.4f} (smoothed: the EMA curve's last value)" if loss is not None else ""
        )
        if p.status == "stopped":
            head = (
                f"Training run #{p.training_run_id} stopped at step {p.step} of {p.steps}; the partial run is "
                "kept"
            )
        else:
            head = f"Training run #{p.training_run_id} finished: {p.step} steps"
        return (
            head
            + (f", {loss_text}" if loss_text else "")
            + ". Its weights are available in the Playground and Evaluate."
        )

    @staticmethod
    def loss_smoothing() -> float:
        return LOSS_SMOOTHING

    # ---- model cards: tokenizer names and what each model was trained on ------------------------------
    def named_tokenizer(self, card: dict) -> dict:
        """The card with `tokenizer_name`: the tokenizer in words ("byte-level BPE, 4,096 tokens · 3f2a9c1d"),
        its identity (the vocabulary hash) kept as a short suffix."""
        kind = None
        try:
            src = load_source(card["alias"], card["ref"], [REPO_ROOT], self.engine.policy)
            path = src.file("tokenizer.json")
            if path is not None and path.stat().st_size < 64 << 20:
                data = json.loads(path.read_text(encoding="utf-8"))
                model = (data.get("model") or {}).get("type")
                pre = json.dumps(data.get("pre_tokenizer") or {})
                kind = ("byte-level " if "ByteLevel" in pre else "") + (model or "tokenizer")
            elif src.file("vocab.json") is not None:
                kind = "byte-level BPE"
        except Exception:  # the card already says what is wrong with a model; a name is a nicety
            kind = None
        fp = card.get("fingerprint")
        vocab = card.get("vocab_size")
        name = (kind or "tokenizer") + (f", {vocab:,} tokens" if isinstance(vocab, int) else "")
        card["tokenizer_name"] = name + (f" · {fp[:8]}" if fp else " (no tokenizer files)")
        return card

    def model_details(self, card: dict) -> dict:
        """What a model's folder says about its training: `training.json` (the demo models' record: steps,
        tokens, the domains it was trained on and its validation perplexities) and the first line of its README
        (what it is good at). Empty where the folder has neither."""
        out: dict[str, Any] = {}
        try:
            src = load_source(card["alias"], card["ref"], [REPO_ROOT], self.engine.policy)
            record_path, readme_path = src.file("training.json"), src.file("README.md")
        except Exception:
            return out
        if readme_path is not None:
            out["good_at"] = readme_summary(readme_path.read_text(encoding="utf-8", errors="replace"))
        if record_path is not None:
            try:
                record = json.loads(record_path.read_text(encoding="utf-8"))
            except ValueError:
                return out
            final = record.get("final") or {}
            chosen = next(
                (c for c in record.get("candidates") or [] if c.get("steps") == final.get("steps")), None
            )
            trained = list((chosen or {}).get("valid_loss_by_domain") or {})
            tokens = ((record.get("corpora") or {}).get("train_tokens")) or {}
            if trained:
                out["trained_on"] = ", ".join(
                    f"{d} ({tokens[d]:,} tokens)" if isinstance(tokens.get(d), int) else d for d in trained
                )
            if final.get("steps"):
                out["training"] = f"{final['steps']:,} steps" + (
                    f", {final['tokens_seen']:,} tokens seen" if final.get("tokens_seen") else ""
                )
            ppl = {d: v.get("ppl") for d, v in (final.get("valid") or {}).items() if isinstance(v, dict)}
            if ppl:
                out["perplexity"] = {d: v for d, v in ppl.items() if isinstance(v, int | float)}
        return out


__all__ = [
    "BUILTIN_CORPORA",
    "StudioController",
    "checked_yaml",
    "edit_lanes_yaml",
    "edit_yaml",
    "save_recipe",
    "train_defaults",
]
