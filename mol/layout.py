"""The module layout of a source model: its parts built on the meta device from its config (no memory, no
weights), so transformers itself says which tensors each part takes and their shapes. Derived once, here:
the plan checks it against the weight headers, the loader fills it."""

from __future__ import annotations

import torch
from torch import nn

from mol.recipe import MixtureSpec

ATTN = "sdpa"


def source_config(src, layers: int | None = None):
    """A copy of the source's config for building parts of it, made as the network makes it (from the same
    values its MoLConfig carries), attention implementation set explicitly; `layers` cuts it to that many."""
    from mol.network.modeling_mol import source_config as network_source_config

    return network_source_config({"config": _config_dict(src)}, ATTN, layers)


def shell(src) -> nn.Module:
    """The source's own model class with one layer, on the meta device: its module tree tells us the classes."""
    from transformers import AutoModelForCausalLM

    cfg = source_config(src, layers=1)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, attn_implementation=ATTN)


def part(shell_module: nn.Module, path: str | None) -> nn.Module | None:
    """The shell's module at `path`; None where this model has none, or it holds no tensors."""
    if not path or not has(shell_module, path):
        return None
    module = shell_module.get_submodule(path)
    return module if module is not None and module.state_dict() else None


def head(src, shell_module: nn.Module) -> tuple[nn.Module, str] | None:
    """The output head and its name in the files (GPT-NeoX saves `embed_out` for the module transformers 5 calls
    `lm_head`); None when the head is tied to the input embedding."""
    in_files = src.family.head_in_files(src.tensors)
    if in_files is None:
        return None
    return next(
        shell_module.get_submodule(h) for h in src.family.head_names() if has(shell_module, h)
    ), in_files


def layer(src, shell_module: nn.Module, index: int) -> nn.Module:
    """Decoder layer `index` of `src` on the meta device, built with its original index (some families scale by
    it)."""
    cls = type(shell_module.get_submodule(src.family.layers)[0])
    with torch.device("meta"):
        return cls(source_config(src), index)


def has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# ---- the fused network's layout, derived once from the plan: mol.build, export and MoLForCausalLM use it ---
def network_config(the_plan, **extra):
    """The MoLConfig that `MoLNetwork` builds itself from: each source's config and where its parts live (its
    family's data), and every slot's experts (source layer, cache index, adapter, window) and router."""
    from mol.network.configuration_mol import MoLConfig

    return MoLConfig(**network_fields(the_plan), **extra)


def network_fields(the_plan) -> dict:
    """What network_config holds, as plain values: a lane's are the same fields, nested under `lanes`."""
    base = the_plan.base
    if the_plan.lanes:
        recipe = the_plan.recipe
        return dict(
            base=base.alias,
            lanes={name: network_fields(p) for name, p in the_plan.lanes.items()},
            stitches=[{**s.to_dict(), "after": list(s.after)} for s in recipe.stitches],
            mixture=(recipe.mixture or MixtureSpec()).to_dict(),
            hidden_size=base.width,
            vocab_size=base.vocab_size,
            num_hidden_layers=the_plan.cache_layers,
            tie_word_embeddings=False,
            **_token_ids(base),
        )
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
    used = {base.alias} | {e.alias for sp in the_plan.slots for e in sp.experts}
    return dict(
        base=base.alias,
        sources={
            a: {"config": _config_dict(s), "modules": _modules(s)}
            for a, s in the_plan.sources.items()
            if a in used
        },
        slots=slots,
        adapter_rank=the_plan.recipe.adapter.rank,
        hidden_size=base.width,
        vocab_size=base.vocab_size,
        num_hidden_layers=the_plan.cache_layers,
        tie_word_embeddings=base.family.head_in_files(base.tensors) is None,
        **_token_ids(base),
    )


def _token_ids(base) -> dict:
    ids = {k: getattr(base.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {k: v for k, v in ids.items() if v is not None}


def file_parts(the_plan) -> list[tuple[str, str, str]]:
    """Every part of the fused network that is read from a source's files: (its module path in the network, the
    source alias, its prefix in that source's files). The rest (adapters, routers) starts at its initial value or
    comes from trained weights; a tied head is the embedding. A lane's parts sit under `lanes.<name>.`."""
    if the_plan.lanes:
        parts = []
        for name, lane in the_plan.lanes.items():
            parts += [(f"lanes.{name}.{path}", alias, prefix) for path, alias, prefix in file_parts(lane)]
            fam = lane.base.family
            if fam.head_in_files(lane.base.tensors) is None:  # a tied head is read as the embedding it equals
                parts.append((f"lanes.{name}.head", lane.base.alias, fam.embed))
        return parts
    base = the_plan.base
    fam = base.family
    parts = [
        (role, base.alias, path)
        for role in ("embed", "positions", "project_in", "project_out", "final_norm")
        if (path := getattr(fam, role)) and any(n.startswith(path + ".") for n in base.tensors)
    ]  # a part the family may have and this model has not (OPT's projections at equal widths) is skipped
    head = fam.head_in_files(base.tensors)
    if head is not None:
        parts.append(("head", base.alias, head))
    for sp in the_plan.slots:
        for j, e in enumerate(sp.experts):
            src = the_plan.sources[e.alias]
            parts.append((f"slots.{sp.index}.experts.{j}.layer", e.alias, f"{src.family.layers}.{e.layer}"))
            if e.add_positions:
                parts.append((f"slots.{sp.index}.experts.{j}.positions", e.alias, src.family.positions))
    return parts


def _modules(src) -> dict:
    """The source's family data, all of it (a field a new family adds travels without a change here), plus the
    names its head may have."""
    from dataclasses import asdict

    data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(src.family).items()}
    for descriptive in ("name", "model_types", "notes", "examples"):
        data.pop(descriptive, None)
    data["head_names"] = list(src.family.head_names())
    return data


def _config_dict(src) -> dict:
    return {
        k: v for k, v in src.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }
