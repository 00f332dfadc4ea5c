"""Routers choose among a slot's expert blocks.

TokenRouter: per token, softmax over experts, top-k, weights renormalised over the chosen k.
PooledRouter: one decision per sequence, from the mean of the prompt's hidden states; in training (and any
forward without a cache) a causal running mean, so no token's decision sees the future.
Both read the slot's input normalised to unit RMS, so one router works whatever the stream's scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    probs: torch.Tensor  # [B, T, n] softmax over experts
    chosen: torch.Tensor  # [B, T, k] expert indices
    weights: torch.Tensor  # [B, T, k] mixing weights of the chosen experts (sum to 1 in value)
    logits: torch.Tensor  # [B, T, n]


def _normalise(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def _top_k(logits: torch.Tensor, k: int) -> Routing:
    probs = logits.softmax(-1)
    top_p, chosen = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True)
    if k == 1:
        # Renormalised top-1 weights are constantly 1 and carry no gradient; the straight-through form keeps
        # the value 1 and lets the language-modelling loss reach the router.
        weights = weights + top_p - top_p.detach()
    return Routing(probs, chosen, weights, logits)


class TokenRouter(nn.Module):
    kind = "token"

    def __init__(self, width: int, n_experts: int, top_k: int = 1):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.proj = nn.Linear(width, n_experts)
        nn.init.zeros_(self.proj.weight)  # uniform at start
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None = None, state: dict | None = None
    ) -> Routing:
        return _top_k(self.proj(_normalise(h)), self.top_k)


class PooledRouter(nn.Module):
    kind = "pooled"
    top_k = 1

    def __init__(self, width: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.proj = nn.Linear(width, n_experts)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Causal running mean over real tokens: [B, T, width]."""
        x = _normalise(h)
        m = torch.ones(x.shape[:2], device=x.device) if attention_mask is None else attention_mask.float()
        total = (x * m.unsqueeze(-1)).cumsum(1)
        count = m.cumsum(1).clamp(min=1).unsqueeze(-1)
        return total / count

    def forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None = None, state: dict | None = None
    ) -> Routing:
        """With `state` (generation), the first call decides from the whole prompt and later calls reuse it."""
        if state is None:
            return _top_k(self.proj(self.features(h, attention_mask)), 1)
        if "logits" not in state:
            feats = self.features(h, attention_mask)[:, -1]  # mean over the whole prompt
            state["logits"] = self.proj(feats)  # [B, n]
        logits = state["logits"].unsqueeze(1).expand(-1, h.shape[1], -1)
        return _top_k(logits, 1)


SimpleRouter = TokenRouter  # the name used by the first quick start


def load_balancing_loss(
    probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer form: N * sum_i f_i * P_i, where f_i is the fraction of (token, choice) assignments
    sent to expert i and P_i the mean gate probability of expert i. Equals 1 for perfectly uniform routing."""
    n = probs.shape[-1]
    p = probs.reshape(-1, n)
    c = chosen.reshape(p.shape[0], -1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        p, c = p[keep], c[keep]
    if p.shape[0] == 0:
        return probs.new_zeros(())
    f = torch.zeros(n, device=p.device).scatter_add_(0, c.reshape(-1), torch.ones(c.numel(), device=p.device))
    f = f / c.numel()
    return n * (f * p.mean(0)).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps router logits small."""
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)
    if mask is not None:
        m = mask.float()
        return (z * m).sum() / m.sum().clamp(min=1)
    return z.mean()


def make_router(kind: str, width: int, n_experts: int, top_k: int = 1) -> nn.Module:
    return PooledRouter(width, n_experts) if kind == "pooled" else TokenRouter(width, n_experts, top_k)
