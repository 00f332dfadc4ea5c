"""mergekit's `slices:` passthrough format, both ways.

    slices:
      - sources:
          - model: org/model-a
            layer_range: [0, 24]      # end exclusive
      - sources:
          - model: org/model-b
            layer_range: [8, 32]
    merge_method: passthrough
    dtype: bfloat16

mergekit's passthrough takes the embeddings from the first slice's model, the final norm and head from the last
slice's, and the config and tokenizer from `base_model` (else a referenced model). A Mango recipe takes all of
them from its base; `import_mergekit` says so when the two differ, and `export_mergekit` refuses recipes whose
passthrough equivalent would not be the same model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mol.errors import RecipeError
from mol.recipe import (
    MAX_LAYER,
    MAX_SLOTS,
    ExpertRef,
    Recipe,
    Slot,
    _short,
    parse_yaml,
    read_text_file,
    to_recipe,
)

_IGNORED_WITH_NOTE = {
    "tokenizer_source": "the tokenizer is the base's (fused models share one vocabulary)",
    "tokenizer": "the tokenizer is the base's (fused models share one vocabulary)",
    "chat_template": "the chat template is the base's",
    "name": "the recipe is named by --name",
}


@dataclass
class MergekitImport:
    recipe: Recipe
    notes: list[str] = field(default_factory=list)  # what the recipe does differently, or ignores
    dtype: str | None = None  # the config's dtype / out_dtype, for `mol export --dtype`


def _load(config: Any) -> tuple[Any, Path | None]:
    """Text is text: a str is YAML, only a Path is read as a file."""
    if isinstance(config, dict):
        return config, None
    if isinstance(config, Path):
        return parse_yaml(
            read_text_file(config, "mergekit config"), "mergekit config"
        ), config.resolve().parent
    if isinstance(config, str):
        return parse_yaml(config, "mergekit config"), None
    raise TypeError(f"import_mergekit takes YAML text, a Path or a dict, not {type(config).__name__}.")


def _model_ref(raw: Any, where: str, notes: list[str] | None = None) -> str:
    """mergekit model references: "org/name", "org/name@revision", "base+lora", or {model: {path, revision},
    lora}. Recipes name models without a revision, so a pinned one is dropped (with a note)."""
    revision = None
    if isinstance(raw, dict):
        if raw.get("lora"):
            raise RecipeError(f"{where}: LoRA-merged models are not supported; merge the LoRA first.")
        inner = raw.get("model", raw)
        if isinstance(inner, dict):
            raw, revision = inner.get("path"), inner.get("revision")
        else:
            raw = inner
    if not isinstance(raw, str) or not raw.strip():
        raise RecipeError(f"{where}: 'model' must be a model path or Hub id, got {_short(raw)}.")
    if "+" in raw:
        raise RecipeError(
            f"{where}: '{_short(raw)}' applies a LoRA ('+'); merge the LoRA into the model first."
        )
    ref = raw.strip()
    if "@" in ref and "/" in ref.split("@", 1)[0]:
        ref, revision = ref.split("@", 1)
    if revision and notes is not None:
        note = f"'{ref}' is pinned to revision '{revision}' in mergekit; the recipe uses what is downloaded."
        if note not in notes:
            notes.append(note)
    return ref


def _alias_for(ref: str, taken: set[str]) -> str:
    name = re.sub(r"@.*$", "", ref.rstrip("/\\")).replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:60] or "model"
    if not re.match(r"[A-Za-z_]", name):
        name = "m_" + name
    alias, n = name, 2
    while alias in taken:
        alias, n = f"{name}-{n}", n + 1
    taken.add(alias)
    return alias


def _no_scaling(params: Any, where: str) -> None:
    if not params:
        return
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: 'parameters' must be a mapping.")
    for key, value in params.items():
        if key == "scale" and value in (1, 1.0):
            continue
        raise RecipeError(
            f"{where}: parameter '{_short(key)}' ({_short(value)}) changes the weights; a Mango recipe stacks "
            "blocks unchanged, so only plain passthrough slices can be imported."
        )


def import_mergekit(config: Any, name: str | None = None) -> MergekitImport:
    """A Mango recipe from a mergekit passthrough config: YAML text (a str, never taken for a path), a Path to
    a YAML file, or a dict."""
    data, source_dir = _load(config)
    if not isinstance(data, dict):
        raise RecipeError("A mergekit config is a mapping with 'slices' and 'merge_method'.")
    method = data.get("merge_method")
    if method != "passthrough":
        raise RecipeError(
            f"merge_method is {_short(method)}: only mergekit's 'passthrough' stacks layers unchanged, "
            "which is what a Mango recipe expresses; averaging methods (linear, slerp, ties, ...) "
            "cannot be imported."
        )
    if data.get("models") or data.get("modules"):
        raise RecipeError(
            "Only 'slices:' configs can be imported ('models:' and 'modules:' are not layer stacks)."
        )
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("The mergekit config needs a non-empty 'slices:' list.")
    _no_scaling(data.get("parameters"), "parameters")

    notes: list[str] = []
    aliases: dict[str, str] = {}
    taken: set[str] = set()
    layers: list[tuple[str, int]] = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            raise RecipeError(
                f"{where}: a slice is {{sources: [{{model: ..., layer_range: [start, end]}}]}}."
            )
        if len(sl["sources"]) != 1:
            raise RecipeError(
                f"{where}: passthrough takes exactly one source per slice, found {len(sl['sources'])}."
            )
        _no_scaling(sl.get("parameters"), f"{where}.parameters")
        src = sl["sources"][0]
        if not isinstance(src, dict):
            raise RecipeError(f"{where}.sources[0]: expected {{model: ..., layer_range: [start, end]}}.")
        _no_scaling(src.get("parameters"), f"{where}.sources[0].parameters")
        ref = _model_ref(src.get("model"), f"{where}.sources[0]", notes)
        lr = src.get("layer_range")
        if (
            not isinstance(lr, list | tuple)
            or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
        ):
            raise RecipeError(
                f"{where}.sources[0].layer_range must be [start, end] (end exclusive), got {_short(lr)}."
            )
        start, end = lr
        if start < 0 or end <= start:
            raise RecipeError(
                f"{where}: layer_range [{_short(start)}, {_short(end)}] is empty or negative; the end "
                "is exclusive, so [n, n + 1] is the single layer n."
            )
        if end > MAX_LAYER or len(layers) + end - start > MAX_SLOTS:  # before range() builds the list
            raise RecipeError(
                f"{where}: layer_range ends past layer {MAX_LAYER:,}, or the import has more than "
                f"{MAX_SLOTS} layers."
            )
        if ref not in aliases:
            aliases[ref] = _alias_for(ref, taken)
        layers.extend((aliases[ref], layer) for layer in range(start, end))

    first_ref = _model_ref(slices[0]["sources"][0]["model"], "slices[0]")
    last_ref = _model_ref(slices[-1]["sources"][0]["model"], f"slices[{len(slices) - 1}]")
    base_model = data.get("base_model")
    if base_model is not None:
        base_ref = _model_ref(base_model, "base_model")
        if base_ref != first_ref:
            notes.append(
                f"base_model '{base_ref}' is not the first slice's model; the recipe's base is "
                f"'{first_ref}' (embeddings, final norm, head and tokenizer all come from it)."
            )
    if last_ref != first_ref:
        notes.append(
            f"mergekit takes the final norm and head from the last slice's model ('{last_ref}'); the "
            f"recipe takes them from its base '{first_ref}'."
        )
    for key, why in _IGNORED_WITH_NOTE.items():
        if data.get(key) is not None:
            notes.append(f"'{key}' is ignored: {why}.")
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        notes.append(
            f"dtype {_short(dtype)}: pass --dtype {_short(dtype)} to `mol export` to write the same "
            "precision."
        )
    known = {"slices", "merge_method", "base_model", "dtype", "out_dtype", "parameters", *_IGNORED_WITH_NOTE}
    unknown = sorted(_short(k) for k in data if k not in known)  # keys may be any YAML value
    if unknown:
        notes.append(f"unknown key(s) ignored: {', '.join(unknown)}.")

    recipe = Recipe(
        name=name or (data["name"] if isinstance(data.get("name"), str) else "") or "mergekit-import",
        base=aliases[first_ref],
        models={alias: ref for ref, alias in aliases.items()},
        slots=[Slot((ExpertRef(alias, layer),)) for alias, layer in layers],
        source_dir=source_dir,
    )
    return MergekitImport(recipe, notes, _short(dtype) if dtype else None)


def mergekit_blockers(the_plan, weights=None) -> list[str]:
    """Why this recipe has no passthrough equivalent (empty: it has one)."""
    from mol.export.standard import standard_blockers
    from mol.export.trainable import parts_matter, trainable_parts

    parts = trainable_parts(the_plan) if parts_matter(the_plan, weights is not None) else None
    if weights is not None:
        from mol.weights import load_trainable

        load_trainable(parts, weights)
    reasons = standard_blockers(the_plan, parts)
    if parts is not None and parts.head_trained:
        reasons.append("the final norm and head were trained; a passthrough config takes the base's.")
    if the_plan.lanes:
        return reasons
    base = the_plan.recipe.base
    first, last = the_plan.slots[0].experts[0], the_plan.slots[-1].experts[0]
    if first.alias != base:
        reasons.append(
            f"mergekit takes the embeddings from the first slice's model, but the first slot is "
            f"'{first.name}' and the recipe's embeddings come from its base '{base}'."
        )
    if last.alias != base:
        reasons.append(
            f"mergekit takes the final norm and head from the last slice's model, but the last slot is "
            f"'{last.name}' and the recipe's come from its base '{base}'."
        )
    return reasons


def export_mergekit(recipe_or_plan: Any, dtype: Any = None, weights=None, public: bool = True) -> str:
    """The mergekit passthrough config of a recipe (a Recipe, a Plan, a Path to a recipe file, or YAML text: a
    str is never a path), or RecipeError saying why there is none.

    `public`: name local models by their relative path or folder name (as in exported folders) rather than
    the absolute path the recipe may hold."""
    from mol.export.card import public_ref
    from mol.planning import Plan, plan

    the_plan = recipe_or_plan if isinstance(recipe_or_plan, Plan) else plan(to_recipe(recipe_or_plan))
    reasons = mergekit_blockers(the_plan, weights)
    if reasons:
        raise RecipeError("This recipe has no mergekit passthrough equivalent: " + " ".join(reasons))

    def ref(alias: str) -> str:
        src = the_plan.sources[alias]
        return public_ref(src) if public else the_plan.recipe.models[alias]

    slices: list[dict] = []
    run_alias, run_start, run_end = None, 0, 0
    for sp in the_plan.slots:
        e = sp.experts[0]
        if e.alias == run_alias and e.layer == run_end:
            run_end += 1
            continue
        if run_alias is not None:
            slices.append({"sources": [{"model": ref(run_alias), "layer_range": [run_start, run_end]}]})
        run_alias, run_start, run_end = e.alias, e.layer, e.layer + 1
    slices.append({"sources": [{"model": ref(run_alias), "layer_range": [run_start, run_end]}]})
    data: dict[str, Any] = {
        "slices": slices,
        "merge_method": "passthrough",
        "base_model": ref(the_plan.recipe.base),
    }
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    return yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False, allow_unicode=True, width=120)


class _FlowListDumper(yaml.SafeDumper):
    """layer_range as [a, b] on one line, as mergekit writes it."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(x, int | float) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
