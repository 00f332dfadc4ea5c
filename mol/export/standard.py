"""Export as the source's own standard architecture: a plain stack of blocks that all share one architecture
(and one layer configuration) becomes that architecture with the new layer count, exactly as mergekit's
`passthrough` method writes it. Loads with `AutoModelForCausalLM.from_pretrained` and no Mango code."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mol.export.shards import TensorEntry, entry_from_file, entry_from_tensor
from mol.export.trainable import is_identity
from mol.planning import Plan

# Config keys that may differ between two sources whose layers are interchangeable: counts, bookkeeping,
# token ids and the tie (the base's embeddings, norm and head are used in both cases).
_LAYER_NEUTRAL_KEYS = {
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "layer_types",
    "max_window_layers",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def standard_blockers(the_plan: Plan, parts) -> list[str]:
    """Why this recipe cannot be written as a standard checkpoint (empty: it can). `parts` (the trainable parts)
    may be None where `parts_matter` says they do not."""
    if the_plan.lanes:
        return [
            f"it runs {len(the_plan.lanes)} lanes side by side and mixes their outputs; a standard "
            "architecture is one stream."
        ]
    base = the_plan.base
    reasons: list[str] = []
    adapters = parts.adapters() if parts is not None else {}
    base_layer_config = _layer_config(base.config)
    for sp in the_plan.slots:
        if sp.routed:
            reasons.append(
                f"slot {sp.index} routes between {len(sp.experts)} experts "
                f"({', '.join(e.name for e in sp.experts)}); standard architectures have no routers."
            )
            continue
        e = sp.experts[0]
        src = the_plan.sources[e.alias]
        if src.model_type != base.model_type:
            reasons.append(
                f"slot {sp.index}: block '{e.name}' is {src.model_type}, the base '{base.alias}' is "
                f"{base.model_type}."
            )
            continue
        if e.alias != base.alias:
            diff = _config_difference(base_layer_config, _layer_config(src.config))
            if diff:
                reasons.append(
                    f"slot {sp.index}: '{e.alias}' configures its layers differently from the base ({diff})."
                )
            if e.add_positions:
                reasons.append(
                    f"slot {sp.index}: block '{e.name}' adds its own model's position embedding when it "
                    "runs in the base's stream."
                )
            adapter = adapters.get(f"slots.{sp.index}.experts.0")
            if adapter is not None and not is_identity(adapter):
                reasons.append(
                    f"slot {sp.index}: the adapter of '{e.name}' is calibrated or trained (not the identity)."
                )
    return reasons


def _layer_config(config) -> dict:
    return {
        k: v for k, v in config.to_dict().items() if k not in _LAYER_NEUTRAL_KEYS and not k.startswith("_")
    }


def _config_difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3]) + (" …" if len(keys) > 3 else "")


def standard_config(the_plan: Plan, dtype: torch.dtype, untie: bool = False):
    """The base's config with the new layer count (and per-layer attention types taken from each block);
    `untie`: the head is a tensor of its own (trained apart from the embedding)."""
    base = the_plan.base
    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = len(the_plan.slots)
    if untie:
        cfg.tie_word_embeddings = False
    if isinstance(getattr(base.config, "layer_types", None), list):
        types = []
        for sp in the_plan.slots:
            e = sp.experts[0]
            types.append(the_plan.sources[e.alias].config.layer_types[e.layer])
        cfg.layer_types = types
    cfg.dtype = str(dtype).removeprefix("torch.")
    return cfg


def standard_entries(the_plan: Plan, dtype: torch.dtype | None, parts=None) -> list[TensorEntry]:
    """Every non-layer tensor of the base under its own name, then each slot's layer renumbered consecutively;
    where `parts` (the trainable parts) trained the final norm and head, theirs replace the base's."""
    base = the_plan.base
    layers = base.family.layers + "."
    pre_roles = [base.family.embed, base.family.positions, base.family.project_in]
    pre_prefixes = tuple(p + "." for p in pre_roles if p)
    non_layer = sorted(n for n in base.tensors if not n.startswith(layers))
    pre = [n for n in non_layer if n.startswith(pre_prefixes)]
    post = [n for n in non_layer if not n.startswith(pre_prefixes)]

    def from_base(name: str) -> TensorEntry:
        return entry_from_file(name, base.tensors[name], dtype)

    entries = [from_base(n) for n in pre]
    for sp in the_plan.slots:
        e = sp.experts[0]
        src = the_plan.sources[e.alias]
        prefix = src.family.layer_prefix(e.layer)
        for name in sorted(n for n in src.tensors if n.startswith(prefix)):
            out = base.family.layer_prefix(sp.index) + name[len(prefix) :]
            entries.append(entry_from_file(out, src.tensors[name], dtype))
    trained = _trained_head(the_plan, parts)
    entries.extend(from_base(n) for n in post if n not in trained)
    entries.extend(entry_from_tensor(n, t, dtype) for n, t in trained.items())
    return entries


def _trained_head(the_plan: Plan, parts) -> dict[str, torch.Tensor]:
    """The trained final norm and head of `parts`, under the base's file names (a tied head as the family's
    head); empty where they were not trained."""
    if parts is None or not parts.head_trained:
        return {}
    fam = the_plan.base.family
    where = {"final_norm": fam.final_norm, "head": fam.head_in_files(the_plan.base.tensors) or fam.head}
    out = {}
    for name, tensor in parts.trainable_state_dict().items():
        role, _, rest = name.partition(".")
        if role in where:
            out[f"{where[role]}.{rest}"] = tensor
    return out


def write_standard_config(the_plan: Plan, folder: Path, dtype: torch.dtype, untie: bool = False) -> None:
    standard_config(the_plan, dtype, untie).save_pretrained(str(folder))
