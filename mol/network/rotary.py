"""Attention layers of the Llama form with their rotary embedding and cache write in one kernel.

transformers' Llama-form attention (Llama, Mistral, Qwen2 and 3, Granite: q/k/v projections, optional per-head
q/k norms, `x * cos + rotate_half(x) * sin`, the cache's update, the attention function, the output projection)
spends a dozen small kernels a layer between its products on the rotary embedding (a negation, a concatenation,
two products and a sum, for the queries and for the keys) and the cache's two copies: at batch 1 on a GPU, about
a third of a decode step's kernels. `fused_attention` swaps such a module for one of a subclass of its own class
(mol.network.subclassing) whose forward runs them as one Triton kernel (mol.network.kernels.rotate_into: the keys
and values written straight into a static cache's buffers; `rotate` before a DynamicCache's update, or where
there is no cache) and otherwise its class's own forward: on the CPU, under torch.compile (inductor fuses the
same work), with a gradient wanted, with another cache."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import kernels
from .subclassing import same_to_rounding, swapped_where_same

_CACHE_NAMES = ("past_key_values", "cache")  # the cache's keyword, by transformers release


class Rotary(nn.Module):
    """Mixed in before a Llama-form attention class: its forward, with the rotary embedding and the cache write
    as one kernel where they can be (`rotates`)."""

    def rotates(self, hidden_states: torch.Tensor, position_embeddings, cache) -> bool:
        """Whether this call runs the kernel: on its device now, not training, cos/sin [B or 1, T, head size], an
        attention function of transformers' (not eager), and a static cache (mol.fast.StaticKV, written by the
        kernel), a DynamicCache (the plain path's, updated as it is) or none."""
        impl = self.config._attn_implementation
        b, t = hidden_states.shape[:2]
        return (
            kernels.runs_on(hidden_states.device)
            and not self.training
            and isinstance(position_embeddings, tuple | list)
            and all(
                f.dim() == 3
                and f.shape[0] in (1, b)
                and f.shape[1:] == (t, self.head_dim)
                and f.stride(-1) == 1
                for f in position_embeddings
            )
            and impl != "eager"
            and impl in ALL_ATTENTION_FUNCTIONS
            and (cache is None or hasattr(cache, "static_buffers") or isinstance(cache, DynamicCache))
        )

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache_name = next((n for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        cache = kwargs.get(cache_name) if cache_name else None
        if not self.rotates(hidden_states, position_embeddings, cache):
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        for name in (*_CACHE_NAMES, "cache_position"):
            kwargs.pop(name, None)
        b, t, _ = hidden_states.shape
        d = self.head_dim
        q = self.q_proj(hidden_states).view(b, t, -1, d)
        k = self.k_proj(hidden_states).view(b, t, -1, d)
        v = self.v_proj(hidden_states).view(b, t, -1, d)
        if getattr(self, "q_norm", None) is not None:  # Qwen3: each head normed before its rotation
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        if not hasattr(cache, "static_buffers"):
            q, k = kernels.rotate(q, k, cos, sin)
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:  # a DynamicCache: its own update, which reads no more than these
                keys, values = cache.update(keys, values, self.layer_idx)
        else:
            keys, values = cache.static_buffers(self.layer_idx, v, torch.result_type(k, cos))
            q = kernels.rotate_into(q, k, v, cos, sin, keys, values, cache.write)
            keys, values = keys[:, :, : cache.visible], values[:, :, : cache.visible]
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention(
            self, q.transpose(1, 2), keys, values, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.o_proj(out.reshape(b, t, -1).contiguous()), weights


def _llama_form(module: nn.Module) -> bool:
    """Whether `module` has what the kernel's forward reads: Linear q/k/v/o projections, a head size, a layer
    index and scaling, and q/k norms (if any) over one head."""
    if not all(
        isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ):
        return False
    d = getattr(module, "head_dim", None)
    if not isinstance(d, int) or d % 2 or not hasattr(module, "layer_idx") or not hasattr(module, "scaling"):
        return False
    norms = [getattr(module, n, None) for n in ("q_norm", "k_norm")]
    if all(n is None for n in norms):
        return True
    return all(isinstance(getattr(n, "weight", None), torch.Tensor) and n.weight.shape == (d,) for n in norms)


def _same_on_a_probe(module: nn.Module, fused: nn.Module) -> bool:
    """Both modules' outputs for three random tokens at random rotations, with no cache."""
    w = module.q_proj.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, w.shape[1], generator=g).to(w.device, w.dtype)
    angles = torch.rand(1, 3, module.head_dim, generator=g) * 6.3
    cos, sin = angles.cos().to(w.device, w.dtype), angles.sin().to(w.device, w.dtype)
    with torch.no_grad():
        got = Rotary.forward(fused, x, (cos, sin), None)[0]  # (no hooks of the module run)
        return same_to_rounding(got, type(module).forward(module, x, (cos, sin), None)[0])


def fused_attention(module: nn.Module) -> nn.Module:
    """`module` as its rotating subclass where it has the Llama form, sits where the kernel runs and gives its
    own outputs on a probe; otherwise `module`."""
    if isinstance(module, Rotary) or not _llama_form(module) or hasattr(module, "_hf_hook"):
        return module
    if module.training or not kernels.available(module.q_proj.weight.device):
        return module
    return swapped_where_same(module, Rotary, lambda fused: _same_on_a_probe(module, fused))
