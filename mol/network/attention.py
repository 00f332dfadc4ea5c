"""The attention every SDPA source block runs: transformers' own SDPA function, except for a one-token step of
grouped-query attention under a mask (decoding). There transformers copies each key-value head once per query
head it serves (`repeat_kv`: the whole cache, every step) or, in some releases, packs the query heads itself;
here each key-value head's query heads are stacked as query rows, so the cache is read as it is and the result is
the same (the same products, summed the same way). Where Triton's kernels run, that step is one kernel that reads
only the keys the mask lets through (mol.network.decode_attention). Registered with transformers under `NAME`."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .decode_attention import decode_attention, supports
from .kernels import runs_on

NAME = "mol_sdpa"


def mol_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (
        kwargs.get("softcap") is None and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
    )
    kernel = (
        plain and dropout == 0.0 and runs_on(query.device) and supports(query, key, value, attention_mask)
    )
    if kernel or (
        groups > 1 and query.shape[2] == 1 and attention_mask is not None and dropout == 0.0 and plain
    ):
        b, heads, _, d = query.shape
        groups = heads // key.shape[1]
        rows = query.reshape(b, key.shape[1], groups, d)  # [B, kv heads, its query heads, D]
        if kernel:
            out = decode_attention(
                rows, key, value, attention_mask, scaling if scaling is not None else d**-0.5
            )
        else:
            mask = attention_mask[:, :, :, : key.shape[2]].expand(b, 1, groups, key.shape[2])
            out = torch.nn.functional.scaled_dot_product_attention(
                rows, key, value, attn_mask=mask, scale=scaling
            )
        return out.reshape(b, heads, 1, d).transpose(
            1, 2
        ), None  # [B, 1, heads, D], as transformers returns it
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(NAME, mol_sdpa)
