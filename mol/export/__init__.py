"""Export: a fused model leaves Mango as a standard Hugging Face folder.

    from mol.export import export
    result = export(Path("recipe.yaml"), "out/my-model", weights="trained.safetensors")
    result.format   # "standard" (the source architecture) or "mol" (MoLForCausalLM + its code)

A plain stack of blocks sharing one architecture is written as that architecture (loads with no Mango code, as
mergekit's passthrough writes it); anything else (routers, adapters, mixed families) as `MoLForCausalLM`.
Weights are streamed tensor by tensor into safetensors shards inside a staging folder that is renamed into
place at the end, so an interrupted export leaves nothing half-written."""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mol.export.auto import register_auto_classes

FORMATS = ("auto", "standard", "mol")
_EXTRA_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json")


@dataclass
class ExportResult:
    path: Path
    format: str  # "standard" or "mol"
    shards: list[dict]  # [{file, tensors, bytes}]
    layers: int  # decoder layers in the written config (slot-experts for "mol")
    dtype: str
    not_standard_because: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "layers": self.layers,
            "dtype": self.dtype,
            "shards": self.shards,
            "total_bytes": self.total_bytes,
            "not_standard_because": self.not_standard_because,
        }


def export(
    recipe_or_model: Any,
    out: str | Path,
    weights: str | Path | None = None,
    *,
    format: str = "auto",
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    evaluation: dict | list | None = None,
    max_size: int | str | None = None,
) -> ExportResult:
    """Write a recipe (a Recipe, a Plan, a Path to a recipe file, or YAML text: a str is never a path) or a built
    FusedModel to the folder `out`.

    `weights`: trained adapters/routers (.safetensors from `mol train` / `save_trainable`); with a FusedModel,
    its own adapters and routers are exported (and `weights`, if given, replaces them). `format`: "auto" picks
    "standard" whenever the recipe allows it. `dtype`: output dtype of floating tensors (default: the
    model's dtype, else the base checkpoint's). `evaluation`: {metric: value} shown in the model card.
    `max_size` ("64GiB", bytes; None: no limit): refuse, before writing, an export larger than this.

    The written folder must load with from_pretrained, every weight present and of the shape its config gives
    (mol.export.verify): else nothing is left at `out` and a CheckpointError says which tensor is wrong."""
    import yaml

    from mol.errors import RecipeError
    from mol.export import card, remote, standard, verify
    from mol.export import early as early_copy
    from mol.export.shards import parse_size, write_shards
    from mol.export.trainable import copy_trainable, parts_matter, trainable_parts
    from mol.recipe import Recipe, to_recipe

    if format not in FORMATS:
        raise RecipeError(f"Unknown export format '{format}'; use one of: {', '.join(FORMATS)}.")
    try:
        shard_bytes = parse_size(max_shard_size)
        limit = parse_size(max_size, zero_ok=True) if max_size is not None else 0
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    early = None
    if weights is None and format != "mol" and isinstance(recipe_or_model, Recipe | Path | str):
        recipe_or_model = to_recipe(recipe_or_model)
        # the weights of a plain frankenmerge start copying now, while the plan is made (mol.export.early)
        early = early_copy.start(recipe_or_model, Path(out), dtype, shard_bytes, limit, overwrite)
    try:
        the_plan, model = _resolve(recipe_or_model)
        trained = weights is not None or model is not None
        # None for a plain stack of the base's own layers with nothing trained (standard, no adapters or routers)
        parts = trainable_parts(the_plan) if format == "mol" or parts_matter(the_plan, trained) else None
        if model is not None:
            copy_trainable(parts, model.trainable_state_dict())
        if weights is not None:
            from mol.weights import load_trainable

            load_trainable(parts, weights)
        head_trained = parts is not None and parts.head_trained
        out_dtype = _dtype(dtype, model, the_plan)

        blockers = standard.standard_blockers(the_plan, parts)
        fmt = format if format != "auto" else ("standard" if not blockers else "mol")
        if fmt == "standard" and blockers:
            raise RecipeError(
                "This recipe cannot be exported as a standard checkpoint: "
                + " ".join(blockers)
                + " Export it with format='mol' (MoLForCausalLM) instead."
            )
        if (
            fmt == "standard"
        ):  # every adapter is the identity and there is no router: only a trained head is written
            trained = head_trained

        out = Path(out)
        recipe_dict = _public_recipe(the_plan)
        recipe_yaml = yaml.safe_dump(recipe_dict, sort_keys=False, allow_unicode=True, width=120)
        with staging(out, overwrite) as folder:
            if fmt == "standard":
                entries = standard.standard_entries(the_plan, out_dtype, parts)
                standard.write_standard_config(the_plan, folder, out_dtype, untie=head_trained)
                layers = len(the_plan.slots)
            else:
                entries = remote.remote_entries(the_plan, parts, out_dtype)
                remote.remote_config(the_plan, parts, out_dtype, recipe_dict).save_pretrained(str(folder))
                remote.copy_code(folder, parts)
                layers = the_plan.cache_layers
                register_auto_classes()  # the check below loads the folder with this network, no remote code
            _check_size(sum(e.nbytes for e in entries), limit, folder)
            shards = (
                early.take(entries, shard_bytes, folder) if early is not None and fmt == "standard" else None
            )
            if shards is None:  # nothing copied early, or not these entries (the early copy is then deleted)
                shards = write_shards(folder, entries, shard_bytes)
            # still in staging: a folder that would not load never reaches `out`
            verify.check_loadable(folder)
            _copy_side_files(the_plan, folder)
            (folder / "mol_recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
            if fmt == "standard" and not head_trained:  # mergekit cannot say "this head, trained"
                _write_mergekit_config(the_plan, folder, out_dtype)
            dtype_name = str(out_dtype).removeprefix("torch.")
            card.write_card(
                folder,
                card.model_card(
                    the_plan,
                    fmt,
                    recipe_yaml,
                    dtype=dtype_name,
                    shards=len(shards),
                    trained=trained,
                    evaluation=evaluation,
                    blockers=blockers,
                ),
            )
        return ExportResult(out, fmt, shards, layers, dtype_name, blockers)
    finally:
        if early is not None:
            early.discard()  # cancelled and deleted, unless its shards were taken


def _check_size(total: int, limit: int, folder: Path) -> None:
    from mol.errors import ResourceError, StorageError

    if limit and total > limit:
        raise ResourceError(
            f"The export would write {_human(total)}, over the limit of {_human(limit)} (max_size, "
            "--max-size); raise the limit, or lift it with --allow-large."
        )
    free = shutil.disk_usage(folder).free
    if total > free:
        raise StorageError(f"The export would write {_human(total)}, but only {_human(free)} is free there.")


def _human(n: int) -> str:
    unit = next(u for u in (3, 2, 1, 0) if n >= 2 ** (10 * u) or u == 0)
    return f"{n / 2 ** (10 * unit):.1f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def _resolve(obj):
    """(Plan, FusedModel or None) from whatever the caller passed."""
    from mol.planning import Plan, plan
    from mol.recipe import Recipe, to_recipe

    if hasattr(obj, "trainable_state_dict") and hasattr(obj, "plan"):
        return obj.plan, obj
    if isinstance(obj, Plan):
        return obj, None
    if isinstance(obj, Recipe | Path | str):
        return plan(to_recipe(obj)), None
    from mol.errors import RecipeError

    raise RecipeError(
        f"export() takes a Recipe, a Path to a recipe file, recipe YAML text, a Plan or a FusedModel, "
        f"not {type(obj).__name__}."
    )


def _dtype(dtype, model, the_plan):
    import torch

    from mol import dtypes
    from mol.errors import RecipeError

    if isinstance(dtype, str):
        if dtype not in dtypes.WEIGHT_NAMES:
            raise RecipeError(f"Unknown dtype '{dtype}'; use one of: {', '.join(dtypes.WEIGHT_NAMES)}.")
        return dtypes.to_torch(dtypes.WEIGHT_NAMES[dtype])
    if dtype is not None:
        return dtype
    if model is not None:
        return model.dtype
    base = the_plan.base
    embed = base.tensors.get(base.family.embed + ".weight")
    # a float8 base is stored that small for serving, not for the adapters and routers written beside it
    wide_float = embed is not None and dtypes.is_float(embed.dtype) and dtypes.itemsize(embed.dtype) > 1
    return dtypes.to_torch(embed.dtype) if wide_float else torch.float32


def _public_recipe(the_plan) -> dict:
    from mol.export.card import public_ref

    d = the_plan.recipe.to_dict()
    d["models"] = {
        a: public_ref(the_plan.sources[a]) if a in the_plan.sources else ref for a, ref in d["models"].items()
    }
    return d


def _write_mergekit_config(the_plan, folder: Path, dtype) -> None:
    """The equivalent mergekit config, beside a standard export, when there is one."""
    from mol.errors import RecipeError
    from mol.export.mergekit import export_mergekit

    try:
        text = export_mergekit(the_plan, dtype=dtype)
    except RecipeError:
        return
    (folder / "mergekit_config.yml").write_text(text, encoding="utf-8")


def _copy_side_files(the_plan, folder: Path) -> None:
    """Tokenizer and generation config of the base, as mergekit copies them from its donor model."""
    from mol.sources import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, *_EXTRA_FILES):
        path = the_plan.base.file(
            name
        )  # checked as every file read from a source is (regular; allowed if hosted)
        if path is not None:
            shutil.copyfile(path, folder / name)


@contextmanager
def staging(out: Path, overwrite: bool = False):
    """A sibling folder to write into; renamed to `out` on success, removed on any failure."""
    from mol.errors import StorageError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StorageError(f"'{out}' exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StorageError(
            f"'{out}' already exists and is not empty; choose another folder or overwrite it "
            "(--force / overwrite=True)."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise StorageError(f"Cannot write into '{out.parent}': {exc}.") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StorageError(f"Writing '{out}' failed: {exc}. Nothing was left behind.") from None
        raise


__all__ = ["ExportResult", "FORMATS", "export", "register_auto_classes", "staging"]
