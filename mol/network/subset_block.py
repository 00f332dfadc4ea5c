"""A routed expert's decoder layer run for the tokens that chose it, and keys and values alone for the rest.

In a token-routed slot an expert's update for a token that chose another expert is weighted by 0, so it need
not be computed; but the expert's attention, at the tokens that did choose it, reads the keys and values of every
earlier token, and its KV cache must stay whole for the tokens still to come. So for a decoder layer of the plain
pre-norm shape (Llama, Mistral, Qwen2, Qwen3):

    every token:   x = input_norm(h);  k, v = rotary(k_norm(k_proj x)), v_proj x   (written to the cache)
    chosen tokens: q = rotary(q_norm(q_proj x));  a = attention(q over every visible k, v)
                   h' = h + o_proj a;  y = h' + mlp(post_norm h')

which is what the layer's own forward gives at those tokens (tests/test_subset_block.py compares them), at about
the cost of one block for the slot rather than one per expert. Queries are laid out per sequence, padded to the
sequence with most of them, so attention stays one batched call; their masks are the step's own mask rows. Other
layer classes run their own forward on every token (ExpertBlock, TokenSubset: the MLP still runs on the chosen
tokens alone)."""

from __future__ import annotations

import torch
from torch import nn

# Decoder layers whose forward is exactly the sequence above (Qwen3 adds the per-head q and k norms); other
# classes of the same families differ (OLMo 2 normalises after attention, SmolLM3 skips rotary on some layers).
SUBSET_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


def runs_on_subsets(layer: nn.Module) -> bool:
    """Whether `layer` is of a class this module runs token by token as its own forward does."""
    if type(layer).__name__ not in SUBSET_LAYERS or not all(hasattr(layer, p) for p in _PARTS):
        return False
    attn = layer.self_attn
    if not all(hasattr(attn, p) for p in _ATTENTION_PARTS):
        return False
    qwen3 = type(layer).__name__ == "Qwen3DecoderLayer"
    return qwen3 == (hasattr(attn, "q_norm") and hasattr(attn, "k_norm"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split as these families apply it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), -1) * sin)


def layer_on_rows(
    layer: nn.Module,
    x: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    widest: int,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    cache=None,
) -> torch.Tensor:
    """The layer's output at the flat token indices `rows` (ascending; [n] of B * T), [n, D]: `x` [B, T, D] is the
    layer's input, `starts` [B] where each sequence's tokens begin in `rows`, `widest` the most tokens of `rows`
    one sequence holds (0: none chose this expert), `position_embeddings` the (cos, sin)
    [B, T, head_dim] of this step, `mask` the step's additive mask [B, 1, T, K] (None: plainly causal after what
    the cache holds), `cache` the transformers cache whose `update` takes this layer's keys and values of every
    token (None: nothing cached)."""
    bsz, length, width = x.shape
    attn = layer.self_attn
    d = attn.head_dim
    qk_norm = hasattr(attn, "q_norm")
    cos, sin = position_embeddings
    normed = layer.input_layernorm(x)
    keys = attn.k_proj(normed).view(bsz, length, -1, d)
    if qk_norm:
        keys = attn.k_norm(keys)
    keys = _rotate(keys.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    values = attn.v_proj(normed).view(bsz, length, -1, d).transpose(1, 2)
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx)
    if widest == 0:  # no token chose this expert: its cache is written, nothing else is needed
        return x.new_zeros(0, width)
    n = rows.shape[0]
    flat_rows = normed.reshape(bsz * length, width)[rows]
    queries = attn.q_proj(flat_rows).view(n, -1, d)
    if qk_norm:
        queries = attn.q_norm(queries)
    cos_rows = cos.reshape(bsz * length, d)[rows].unsqueeze(1)
    sin_rows = sin.reshape(bsz * length, d)[rows].unsqueeze(1)
    queries = _rotate(queries, cos_rows, sin_rows)  # [n, heads, d]

    # Each sequence's queries side by side, padded to the longest: [B, heads, widest, d]
    seq = rows // length
    place = seq * widest + (torch.arange(n, device=rows.device) - starts[seq])
    heads = queries.shape[1]
    padded = queries.new_zeros(bsz * widest, heads, d).index_copy(0, place, queries)
    padded = padded.view(bsz, widest, heads, d).transpose(1, 2)
    position = torch.zeros(bsz * widest, dtype=torch.long, device=rows.device)
    position = position.index_copy(0, place, rows % length).view(bsz, widest)  # padding: position 0's row
    n_keys = keys.shape[2]
    if mask is not None:
        rows_mask = mask[:, 0, :, :n_keys]  # [B, T, K]
        index = position.unsqueeze(-1).expand(bsz, widest, n_keys)
        allowed = torch.gather(rows_mask, 1, index).unsqueeze(1)  # [B, 1, widest, K]
    else:
        past = n_keys - length
        allowed = torch.arange(n_keys, device=rows.device) <= (position + past).unsqueeze(-1)
        allowed = allowed.unsqueeze(1)
    groups = heads // keys.shape[1]
    if groups > 1:  # every query head its key-value head (the mask rules out the grouped flash kernel anyway)
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    out = nn.functional.scaled_dot_product_attention(
        padded, keys.to(padded.dtype), values.to(padded.dtype), attn_mask=allowed, scale=attn.scaling
    )
    out = out.transpose(1, 2).reshape(bsz * widest, heads * d)[place]  # [n, heads * d]
    h = x.reshape(bsz * length, width)[rows] + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h))
