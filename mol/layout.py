"""The module layout of a source model: its parts built on the meta device from its config (no memory, no
weights), so transformers itself says which tensors each part takes and their shapes. Derived once, here:
the plan checks it against the weight headers, the loader fills it."""

from __future__ import annotations

import copy

import torch
from torch import nn

ATTN = "sdpa"


def source_config(src, layers: int | None = None):
    """A copy of the source's config for building parts of it, attention implementation set explicitly: left
    unset, the mask comes back None and attention is not causal."""
    cfg = copy.deepcopy(src.config)
    if layers is not None:
        cfg.num_hidden_layers = layers
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:layers]
    cfg._attn_implementation = ATTN
    cfg.use_cache = True
    return cfg


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
