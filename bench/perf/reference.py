"""A gpt-fast-style reference decoder for the bench's Llama: the peer baseline the fast path is measured against.

transformers' own documented fast path (static cache + `torch.compile(mode="reduce-overhead")`) fails on the
pinned release, so the bench carries its own, in the style of gpt-fast: the transformers model's very weights
(shared, not copied), a static KV cache held as buffers, the mask a slice of one causal matrix, and one-token
steps compiled with `mode="reduce-overhead"` (CUDA graphs through inductor). Greedy only; the prompt runs
eagerly through the same code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), -1) * sin


class ReferenceDecoder(nn.Module):
    def __init__(self, hf_model, batch_size: int, capacity: int):
        super().__init__()
        cfg = hf_model.config
        self.hf = hf_model  # its parameters: static inputs of the captured graphs
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        weight = hf_model.model.embed_tokens.weight
        dev, dt = weight.device, weight.dtype
        shape = (batch_size, self.kv_heads, capacity, self.head_dim)
        layers = len(hf_model.model.layers)
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, device=dev, dtype=dt), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, device=dev, dtype=dt), persistent=False)
        rotary = hf_model.model.rotary_emb
        freqs = torch.outer(torch.arange(capacity, device=dev).float(), rotary.inv_freq.float().to(dev))
        emb = torch.cat((freqs, freqs), -1)
        scale = getattr(rotary, "attention_scaling", 1.0)
        self.register_buffer("cos", (emb.cos() * scale).to(dt), persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).to(dt), persistent=False)
        causal = torch.tril(torch.ones(capacity, capacity, dtype=torch.bool, device=dev))
        self.register_buffer("causal", causal, persistent=False)
        self.step = self.forward

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed `ids` [B, T] at positions `pos` [T]; returns the last position's logits [B, vocab]."""
        m = self.hf.model
        x = m.embed_tokens(ids)
        bsz, t, _ = x.shape
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        mask = self.causal[pos][None, None]  # [1, 1, T, capacity]
        rep = self.heads // self.kv_heads
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm.weight, self.eps)
            q = a.q_proj(h).view(bsz, t, self.heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            k, v = kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + a.o_proj(y.transpose(1, 2).reshape(bsz, t, -1))
            p = layer.mlp
            h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
            x = x + p.down_proj(F.silu(p.gate_proj(h)) * p.up_proj(h))
        x = _rms(x[:, -1:], m.norm.weight, self.eps)
        return self.hf.lm_head(x)[:, -1].float()

    def compile_step(self) -> None:
        """gpt-fast's setting: the one-token step compiled whole, replayed as CUDA graphs."""
        self.step = torch.compile(self.forward, mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        q = ids.shape[1]
        pos = torch.arange(q, device=ids.device)
        nxt = self.forward(ids, pos).argmax(-1, keepdim=True)
        out = [nxt]
        for i in range(max_new_tokens - 1):
            pos = torch.tensor([q + i], device=ids.device)
            nxt = self.step(nxt, pos).argmax(-1, keepdim=True).clone()  # clone: the graph reuses its output
            out.append(nxt)
        return torch.cat([ids, *out], 1)
