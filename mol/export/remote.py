"""Export as a `MoLForCausalLM` folder: a custom config holding the recipe and each source's architecture, every
weight (source blocks, base embeddings/norm/head, adapters, routers) in safetensors shards, and the modelling
code beside them. Tensor names follow `FusedModel.state_dict()`, so the loaded model mirrors the runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mol import layout
from mol.export.shards import TensorEntry, entry_from_file, entry_from_tensor
from mol.export.trainable import TrainableParts
from mol.planning import Plan
from mol.sources import ModelSource

CODE_FILES = ("configuration_mol.py", "modeling_mol.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mol.MoLConfig",
    "AutoModelForCausalLM": "modeling_mol.MoLForCausalLM",
}
_BASE_ROLES = ("embed", "positions", "project_in", "project_out", "final_norm")


def _modules(src: ModelSource) -> dict:
    fam = src.family
    return {
        "layers": fam.layers,
        "embed": fam.embed,
        "head_names": list(fam.head_names()),
        "final_norm": fam.final_norm,
        "rotary": fam.rotary,
        "positions": fam.positions,
        "position_offset": fam.position_offset,
        "project_in": fam.project_in,
        "project_out": fam.project_out,
        "layer_takes": list(fam.layer_takes),
        "embedding_multiplier": fam.embedding_multiplier,
        "logits_divisor": fam.logits_divisor,
    }


def _config_dict(src: ModelSource) -> dict:
    return {
        k: v for k, v in src.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }


def remote_config(the_plan: Plan, dtype: torch.dtype, recipe_dict: dict):
    from mol.export.configuration_mol import MoLConfig

    base = the_plan.base
    slots = []
    for sp in the_plan.slots:
        r = sp.slot.router
        slots.append(
            {
                "experts": [
                    {
                        "name": e.name,
                        "alias": e.alias,
                        "layer": e.layer,
                        "cache_index": e.cache_index,
                        "adapter": e.adapter,
                        "add_positions": e.add_positions,
                        "window": e.window,
                    }
                    for e in sp.experts
                ],
                "router": None if r is None else r.to_dict(),
            }
        )
    ids = {k: getattr(base.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg = MoLConfig(
        base=base.alias,
        sources={a: {"config": _config_dict(s), "modules": _modules(s)} for a, s in the_plan.sources.items()},
        slots=slots,
        recipe=recipe_dict,
        adapter_rank=the_plan.recipe.adapter.rank,
        hidden_size=base.width,
        vocab_size=base.vocab_size,
        num_hidden_layers=the_plan.cache_layers,
        tie_word_embeddings=base.family.head_in_files(base.tensors) is None,
        architectures=["MoLForCausalLM"],
        auto_map=dict(AUTO_MAP),
        **{k: v for k, v in ids.items() if v is not None},
    )
    cfg.dtype = str(dtype).removeprefix("torch.")
    return cfg


def remote_entries(the_plan: Plan, parts: TrainableParts, dtype: torch.dtype | None) -> list[TensorEntry]:
    """What the runtime's loader reads, under the fused model's own names: each module is built on the meta
    device to learn its tensor names, exactly as `mol.build` does (mol.layout)."""
    base = the_plan.base
    shells = {a: layout.shell(s) for a, s in the_plan.sources.items()}
    entries: list[TensorEntry] = []

    def add(src: ModelSource, module: torch.nn.Module, file_prefix: str, out_prefix: str) -> None:
        for name in module.state_dict():
            entries.append(
                entry_from_file(f"{out_prefix}.{name}", src.tensors[f"{file_prefix}.{name}"], dtype)
            )

    for role in _BASE_ROLES:
        path = getattr(base.family, role)
        mod = layout.part(shells[base.alias], path)
        if mod is not None:
            add(base, mod, path, role)
    head = layout.head(base, shells[base.alias])
    if head is not None:  # otherwise tied to the embedding (config.tie_word_embeddings)
        add(base, *head, "head")
    for sp in the_plan.slots:
        for j, e in enumerate(sp.experts):
            src, shell = the_plan.sources[e.alias], shells[e.alias]
            out = f"slots.{sp.index}.experts.{j}"
            add(src, layout.layer(src, shell, e.layer), f"{src.family.layers}.{e.layer}", f"{out}.layer")
            if e.add_positions:
                add(src, layout.part(shell, src.family.positions), src.family.positions, f"{out}.positions")
    for name, tensor in parts.trainable_state_dict().items():
        # Routers run in float32 whatever the model's dtype (as in the runtime); adapters follow the model.
        entries.append(entry_from_tensor(name, tensor, None if ".router." in name else dtype))
    return entries


def copy_code(folder: Path) -> None:
    here = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, folder / name)
