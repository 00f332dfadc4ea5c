"""The model card (README.md) written with every export: the recipe, the sources with their licences where
known, how to load the result, and evaluation results when there are any."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mol.errors import RecipeError
from mol.planning import Plan
from mol.recipe import parse_yaml
from mol.sources import ModelSource

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def public_ref(src: ModelSource) -> str:
    """How a source is named in published files: its Hub id, or a relative path as written, or only the folder's
    name (an absolute path says nothing useful to a reader and exposes the author's file system)."""
    if src.hub_id:
        return src.hub_id
    ref = src.ref.strip()
    if ref.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", ref):
        return src.folder.name
    return ref


def source_licence(src: ModelSource) -> str | None:
    """The licence a source's own model card declares (`license:` in its front matter), if it has one."""
    readme = src.file("README.md")  # checked as every file read from a source is
    if readme is None:
        return None
    try:
        m = _FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
        meta = parse_yaml(m.group(1), "model card") if m else None
    except (OSError, RecipeError):  # an unreadable or hostile card just has no licence to report
        return None
    if not isinstance(meta, dict) or not meta.get("license"):
        return None
    licence = str(meta["license"])
    if licence == "other" and meta.get("license_name"):
        licence = f"other ({meta['license_name']})"
    return licence


def _combined_licence(licences: list[str | None]) -> str:
    known = {v for v in licences if v}
    if not known:
        return "unknown"
    return known.pop() if len(known) == 1 and None not in licences else "other"


def _evaluation_rows(evaluation) -> list[tuple[str, str]]:
    if not evaluation:
        return []
    if isinstance(evaluation, dict):
        items = evaluation.items()
    else:  # [{"name": ..., "value": ...}, ...]
        items = [(e.get("name") or e.get("metric"), e.get("value")) for e in evaluation]
    rows = []
    for name, value in items:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append((str(name), shown))
    return rows


def model_card(
    the_plan: Plan,
    fmt: str,
    recipe_yaml: str,
    *,
    dtype: str,
    shards: int,
    trained: bool,
    evaluation=None,
    blockers: list[str] | None = None,
) -> str:
    recipe = the_plan.recipe
    licences = {a: source_licence(s) for a, s in the_plan.sources.items()}
    hub_ids = sorted({s.hub_id or s.ref for s in the_plan.sources.values() if s.hub_id})
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["mol", "mango", "merge", "layer-fusion" if fmt == "mol" else "passthrough"],
        "license": _combined_licence(list(licences.values())),
    }
    if hub_ids:
        meta["base_model"] = hub_ids
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {recipe.name}", ""]
    routed = sum(s.routed for s in the_plan.slots)
    lines.append(
        f"A model fused with Mango (MoL Studio) from {len(the_plan.sources)} source model(s): "
        f"{len(the_plan.slots)} slots, {routed} routed, base `{recipe.base}`."
    )
    lines.append("")
    lines.append("## Loading")
    lines.append("")
    lines.append("```python")
    lines.append("from transformers import AutoModelForCausalLM, AutoTokenizer")
    if fmt == "standard":
        lines.append('model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")')
    else:
        lines.append("# the modelling code is part of this repository; with Mango installed (`import mol`),")
        lines.append("# trust_remote_code is not needed")
        lines.append(
            'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)'
        )
    if fmt == "standard":
        lines.append('tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")')
    else:
        # AutoTokenizer reads config.json first (transformers 5), and a config that is remote code asks
        # "Do you wish to run the custom code? [y/N]" unless it is trusted: the tokenizer needs the flag too.
        lines.append(
            'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>", trust_remote_code=True)'
        )
    lines.append("```")
    lines.append("")
    if fmt == "standard":
        lines.append(
            f"Format: the base's own architecture (`{the_plan.base.model_type}`) with "
            f"{len(the_plan.slots)} layers, as mergekit's `passthrough` method writes it."
        )
    else:
        lines.append(
            "Format: `MoLForCausalLM` (custom code: `modeling_mol.py`, `configuration_mol.py`). "
            "Each block runs as its source architecture's own decoder layer."
        )
        for reason in blockers or []:
            lines.append(f"- not a standard checkpoint because {reason}")
    weights = f"Weights: {dtype}, {shards} safetensors shard(s)"
    if fmt == "mol":
        weights += "; adapters and routers " + (
            "trained or calibrated" if trained else "at their starting values (identity, uniform)"
        )
    lines.append(weights + ".")
    lines.append("")
    lines.append("## Sources")
    lines.append("")
    lines.append("| alias | model | architecture | layers | width | licence |")
    lines.append("|---|---|---|---|---|---|")
    for alias, src in the_plan.sources.items():
        lines.append(
            f"| {alias} | {public_ref(src)} | {src.model_type} | {src.num_layers} | {src.width} | "
            f"{licences[alias] or 'unknown'} |"
        )
    lines.append("")
    lines.append("The result inherits the terms of every source; check each licence before use.")
    lines.append("")
    lines.append("## Recipe")
    lines.append("")
    lines.append("```yaml")
    lines.append(recipe_yaml.rstrip())
    lines.append("```")
    lines.append("")
    rows = _evaluation_rows(evaluation)
    lines.append("## Evaluation")
    lines.append("")
    if rows:
        lines.append("| metric | value |")
        lines.append("|---|---|")
        lines.extend(f"| {name} | {value} |" for name, value in rows)
    else:
        lines.append("No evaluation results were recorded for this export.")
    lines.append("")
    return "\n".join(lines)


def write_card(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text, encoding="utf-8")
