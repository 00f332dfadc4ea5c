"""What a fresh studio opens with: the shipped example recipes and trained weights, seeded into the database.

seed_shipped(repo)              # every start; adds only what was never seeded (idempotent, one transaction each)
best_shipped_fusion(repo)       # the recipe version + trained result the Playground opens on first

Each `assets/recipes/*.yaml` becomes version 1 of a recipe of its name (stored as the studio stores every recipe:
canonical YAML, model paths relative to the repository). Each `assets/weights/<name>.safetensors` with its run
file `<name>.train.json` (which records the recipe it was trained for, its config, data and loss curve) becomes a
completed training run of that version with origin "shipped", as a training run in the studio would leave it.
A recipe of the user's with the same name is never touched (nothing is added for it), a shipped recipe the user
renamed, edited or deleted is not brought back, and a file that is missing or damaged is skipped with a logged
warning while the rest is seeded. Nothing here raises: a start must not fail over an example."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mol.recipe import Recipe

from .db.models import NOTE_MAX
from .db.repository import Repository, ShippedSeedResult, ShippedWeights, TrainedResultInfo, VersionInfo

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".train.json"
# The shipped trained fusions the Playground opens on first when no run file records a mixed-text perplexity
# (`recorded_mixed_perplexity`), best first; unlisted ones follow by name. Seeding follows the same order, so these
# are also the first recipes listed. The lanes fusions lead: each demo model keeps its own stream and head, and the
# output mixture carries the specialists' knowledge to the output, where a single stream through one frozen head
# cannot (bench/fusion/README.md); the heatmap shows which lane the gate picks per token. fused-token follows: its
# per-token routing is what the router heatmap is for (the pooled recipe decides once per sequence).
SHIPPED_FUSION_PREFERENCE = ("lanes-trio", "lanes-branches", "fused-token", "fused-pooled")


@dataclass(frozen=True)
class SeedReport:
    results: tuple[ShippedSeedResult, ...]  # one per shipped recipe that could be read
    skipped: tuple[str, ...]  # files not seeded, each with the reason (also logged as warnings)

    @property
    def added_recipes(self) -> tuple[str, ...]:
        return tuple(r.recipe_name for r in self.results if r.status == "seeded")

    @property
    def added_training_runs(self) -> tuple[int, ...]:
        return tuple(i for r in self.results for i in r.added_training_runs)


@dataclass(frozen=True)
class StartingFusion:
    """What the Playground opens on first: a recipe version and one trained result of it."""

    version: VersionInfo
    result: TrainedResultInfo


# ---------------------------------------------------------------------------------------------- reading files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_safetensors(path: Path) -> int:
    """The number of tensors in a safetensors file, after checking its header and that the data it describes
    is all there (a truncated or foreign file raises ValueError). Reads the header only."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size or n > 100 << 20:
            raise ValueError("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise ValueError("holds no tensors")
    end = 0
    for name, t in tensors.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r} has no valid data offsets")
        if not 0 <= offsets[0] <= offsets[1]:
            raise ValueError(f"tensor {name!r} has invalid data offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise ValueError(f"is {size:,} bytes, its header describes {8 + n + end:,} (truncated or damaged)")
    return len(tensors)


def _absolute(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))  # ".." removed, links kept


def _portable(path: Path, root: Path) -> str:
    """A path under `root` as a relative POSIX path (how the studio stores model folders), else absolute.
    Tried as written (a linked models folder inside the checkout stays inside it), then with links resolved."""
    for p, r in ((_absolute(path), _absolute(root)), (path.resolve(), root.resolve())):
        if p.is_relative_to(r):
            return p.relative_to(r).as_posix()
    return str(path.resolve())


def canonical_recipe(recipe: Recipe, base_dir: Path, root: Path) -> Recipe:
    """`recipe` with each model folder given relative to `base_dir` (as in a recipe file) rewritten relative
    to `root` (as the studio stores them; what `StudioEngine.recipe_from_file` does). Hub ids stay."""
    models = {}
    for alias, ref in recipe.models.items():
        local = base_dir / ref
        models[alias] = _portable(local, root) if local.is_dir() else ref
    return Recipe.from_dict({**recipe.to_dict(), "models": models}, source_dir=root)


def _recipe_key(recipe: Recipe) -> str:
    """What weights depend on: everything in the recipe but where its model folders are (only their names), so
    a run file written on another machine (absolute paths) still matches."""
    d = recipe.to_dict()
    d["models"] = {a: PurePosixPath(str(ref).replace("\\", "/")).name for a, ref in recipe.models.items()}
    return json.dumps(d, sort_keys=True)


def _header_note(text: str, filename: str) -> str:
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    note = f"Shipped example (assets/recipes/{filename})."
    if comment:
        note += " " + " ".join(c for c in comment if c)
    return note if len(note) <= NOTE_MAX else note[: NOTE_MAX - 1] + "…"


def recorded_mixed_perplexity(record: dict[str, Any]) -> float | None:
    """The mixed prose-and-code perplexity a run file records, if it records one: `metrics.mixed_perplexity`,
    `eval.perplexity.mixed` (as bench/fusion rows have it) or, in a `mol eval` report under `eval`, the fused
    row's `domains.mixed.perplexity`. The shipped run files record none today."""

    def number(v: Any) -> float | None:
        return (
            float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
        )

    metrics = record.get("metrics")
    if isinstance(metrics, dict) and number(metrics.get("mixed_perplexity")) is not None:
        return number(metrics["mixed_perplexity"])
    ev = record.get("eval")
    if not isinstance(ev, dict):
        return None
    ppl = ev.get("perplexity")
    if isinstance(ppl, dict) and number(ppl.get("mixed")) is not None:
        return number(ppl["mixed"])
    for row in ev.get("rows") or []:
        if isinstance(row, dict) and row.get("kind") == "fused":
            mixed = (row.get("domains") or {}).get("mixed")
            if isinstance(mixed, dict) and number(mixed.get("perplexity")) is not None:
                return number(mixed["perplexity"])
    return None


@dataclass
class _ShippedRecipe:
    path: Path
    recipe: Recipe  # canonical (see canonical_recipe)
    yaml_text: str
    sha256: str
    note: str
    weights: list[ShippedWeights]


def _read_recipe(path: Path, root: Path) -> _ShippedRecipe:
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    recipe = canonical_recipe(Recipe.from_yaml(text, source_dir=path.parent.resolve()), path.parent, root)
    return _ShippedRecipe(
        path, recipe, recipe.to_yaml(), hashlib.sha256(raw).hexdigest(), _header_note(text, path.name), []
    )


def _read_weights(record_path: Path, recipes_dir: Path, root: Path) -> tuple[Recipe, ShippedWeights]:
    """The recipe a run file says its weights were trained for, and the weights as a trained result."""
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), str):
        raise ValueError("the run file records no recipe")
    trained_for = canonical_recipe(
        Recipe.from_yaml(record["recipe"], source_dir=recipes_dir), recipes_dir, root
    )
    weights = record_path.with_name(record_path.name.removesuffix(RECORD_SUFFIX) + WEIGHTS_SUFFIX)
    if not weights.is_file():
        raise FileNotFoundError(f"its weights file {weights.name} is missing")
    try:
        check_safetensors(weights)
    except ValueError as e:
        raise ValueError(f"its weights file {weights.name} {e}") from None

    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    data_refs = {
        name: [_portable(Path(p), root) for p in (d.get("paths") or [])] if isinstance(d, dict) else []
        for name, d in data.items()
    }
    metrics = dict(record.get("metrics") or {})
    mixed = recorded_mixed_perplexity(record)
    if mixed is not None:
        metrics["mixed_perplexity"] = mixed
    curve = [p for p in record.get("curve") or [] if isinstance(p, dict)]
    config = {
        "train": dict(record.get("config") or {}),
        "data": data_refs,
        "shipped": {
            "weights": weights.name,
            "run_file": record_path.name,
            **{k: record[k] for k in ("hardware", "torch", "step", "init") if k in record},
        },
    }
    return trained_for, ShippedWeights(
        weights.name, _sha256(weights), str(weights.resolve()), config, metrics, curve
    )


def _seed_order(recipes: list[_ShippedRecipe]) -> list[_ShippedRecipe]:
    """Recipes are listed most recently saved first: seed so that the preferred fusions end up on top."""

    def rank(r: _ShippedRecipe) -> tuple[int, str]:
        stem = r.path.stem
        pref = SHIPPED_FUSION_PREFERENCE
        return (pref.index(stem) if stem in pref else len(pref), r.path.name)

    return sorted(recipes, key=rank, reverse=True)


# ---------------------------------------------------------------------------------------------- seeding


def seed_shipped(
    repo: Repository, assets_dir: str | Path = ASSETS_DIR, *, root: str | Path | None = None
) -> SeedReport:
    """Seed `repo` with the example recipes in `<assets_dir>/recipes` and the trained weights in
    `<assets_dir>/weights` (see the module docstring). Idempotent; safe to call on every start and from
    several processes at once (each recipe is one write transaction). Model folders are stored relative to
    `root` (default: the folder above `assets_dir`, the repository). Never raises for a bad file: skipped
    files are logged as warnings and listed in the report."""
    assets_dir = Path(assets_dir)
    root = Path(root) if root is not None else _absolute(assets_dir).parent
    recipes_dir, weights_dir = assets_dir / "recipes", assets_dir / "weights"
    skipped: list[str] = []

    def skip(what: str) -> None:
        skipped.append(what)
        log.warning("Shipped example not seeded: %s", what)

    recipes: list[_ShippedRecipe] = []
    paths = (
        sorted(p for p in recipes_dir.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
        if recipes_dir.is_dir()
        else []
    )
    for path in paths:
        try:
            recipes.append(_read_recipe(path, root))
        except Exception as e:  # unreadable, not UTF-8, not a valid recipe: the others still seed
            skip(f"{path.name}: {e}")

    by_key = {}
    for r in recipes:
        by_key.setdefault(_recipe_key(r.recipe), r)
    records = sorted(weights_dir.glob(f"*{RECORD_SUFFIX}")) if weights_dir.is_dir() else []
    recorded = {p.name.removesuffix(RECORD_SUFFIX) for p in records}
    for w in sorted(weights_dir.glob(f"*{WEIGHTS_SUFFIX}")) if weights_dir.is_dir() else []:
        if w.name.removesuffix(WEIGHTS_SUFFIX) not in recorded:
            skip(f"{w.name}: no run file {w.stem}{RECORD_SUFFIX} says which recipe it was trained for")
    for record_path in records:
        try:
            trained_for, weights = _read_weights(record_path, recipes_dir, root)
        except Exception as e:
            skip(f"{record_path.name}: {e}")
            continue
        target = by_key.get(_recipe_key(trained_for))
        if target is None:
            same_name = [r.path.name for r in recipes if r.recipe.name == trained_for.name]
            skip(
                f"{weights.asset}: trained for recipe {trained_for.name!r}, "
                + (f"which differs from the shipped {same_name[0]}" if same_name else "which is not shipped")
            )
            continue
        target.weights.append(weights)

    results: list[ShippedSeedResult] = []
    for r in _seed_order(recipes):
        try:
            result = repo.seed_shipped_recipe(
                r.recipe.name, r.yaml_text, asset=r.path.name, sha256=r.sha256, note=r.note, weights=r.weights
            )
        except Exception as e:  # a database error: this recipe is not seeded, the others are tried
            skip(f"{r.path.name}: {e}")
            continue
        results.append(result)
        if result.status == "name-taken":
            log.info(
                "Shipped example %s not seeded: a recipe named %r exists already.", r.path.name, r.recipe.name
            )
        if result.status == "seeded":
            for reason in result.skipped_weights:
                skip(reason)
        elif (
            result.skipped_weights and result.status == "present"
        ):  # the user's edits stand; said once per start
            log.info("Shipped weights not added: %s", "; ".join(result.skipped_weights))
    return SeedReport(tuple(results), tuple(skipped))


def best_shipped_fusion(repo: Repository) -> StartingFusion | None:
    """The shipped trained fusion the Playground should open on first: of the shipped trained results whose
    recipe is live and whose weights file is there, the one with the lowest recorded mixed-text perplexity
    (`metrics.mixed_perplexity`, from the run file); without one, by SHIPPED_FUSION_PREFERENCE, then by name.
    None when nothing shipped is in the database."""

    def key(r: TrainedResultInfo) -> tuple[float, int, str]:
        ppl = r.run.metrics.get("mixed_perplexity")
        ppl = float(ppl) if isinstance(ppl, (int, float)) and math.isfinite(ppl) else math.inf
        stem = (r.shipped_asset or "").removesuffix(WEIGHTS_SUFFIX)
        pref = SHIPPED_FUSION_PREFERENCE
        return (ppl, pref.index(stem) if stem in pref else len(pref), r.label)

    results = repo.list_trained_results(shipped=True)
    if not results:
        return None
    best = min(results, key=key)
    return StartingFusion(repo.get_version_by_id(best.version_id), best)


__all__ = [
    "ASSETS_DIR",
    "SHIPPED_FUSION_PREFERENCE",
    "SeedReport",
    "StartingFusion",
    "best_shipped_fusion",
    "canonical_recipe",
    "check_safetensors",
    "recorded_mixed_perplexity",
    "seed_shipped",
]
