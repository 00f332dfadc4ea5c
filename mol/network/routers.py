"""Routers choose among a slot's expert blocks. Each kind is a module that scores the experts ([B, T, n] logits)
from the slot's input; the slot takes softmax, top-k and the mixing weights from those scores the same way for
every kind. Kinds are registered by name (the recipe's `router.type`), so a new kind is one class:

    @register_router
    class MyRouter(nn.Module):
        kind = "mine"            # the recipe's router type
        per_sequence = False     # True: one decision per sequence (held in `state` while generating)
        takes_top_k = True       # False: always top-1, and a recipe may not set top_k

        def __init__(self, width: int, n_experts: int, top_k: int = 1): ...
        def features(self, h, attention_mask) -> Tensor: ...   # [B, T, width]: what the scores read
        def forward(self, h, attention_mask, state) -> Tensor:  # [B, T, n] scores
        def uniform_(self) -> None: ...  # optional: every expert equally likely (mol.router_init); default: proj zeroed

`features` is also what the closed-form (ridge) initialisation fits `proj` on. Built in:
TokenRouter: per token, from the slot input at unit RMS.
PooledRouter: one decision per sequence, from the mean of the prompt's hidden states; in training (and any
forward without a cache) a causal running mean, so no token's decision sees the future.
EvidenceGate: the lanes' output gate from how well each lane predicted the recent tokens (reads log-probabilities,
declared by `reads = "evidence"`).
A kind defined outside this file travels with an export as its own file (see `router_code`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ROUTERS: dict[str, type[nn.Module]] = {}


def register_router(cls: type[nn.Module]) -> type[nn.Module]:
    """Register a router kind under `cls.kind` (a class decorator). A name registered twice keeps the newest."""
    for attr in ("kind", "per_sequence", "takes_top_k"):
        if not hasattr(cls, attr):
            raise TypeError(f"A router kind declares `{attr}`; {cls.__name__} does not.")
    ROUTERS[cls.kind] = cls
    return cls


def router_kind(kind: str) -> type[nn.Module]:
    cls = ROUTERS.get(kind)
    if cls is None:
        raise KeyError(f"Router type '{kind}' is not one of: {', '.join(sorted(ROUTERS))}.")
    return cls


def make_router(kind: str, width: int, n_experts: int, top_k: int = 1) -> nn.Module:
    cls = router_kind(kind)
    return cls(width, n_experts, top_k) if cls.takes_top_k else cls(width, n_experts)


@dataclass
class Routing:
    probs: torch.Tensor  # [B, T, n] softmax over experts
    chosen: torch.Tensor  # [B, T, k] expert indices
    weights: torch.Tensor  # [B, T, k] mixing weights of the chosen experts (sum to 1 in value)
    logits: torch.Tensor  # [B, T, n]


def route(router: nn.Module, h: torch.Tensor, attention_mask, state: dict | None) -> Routing:
    """A router's scores turned into a routing: softmax over experts, the top-k, weights renormalised over them."""
    logits = router(h, attention_mask, state)
    k = getattr(router, "top_k", 1) if router.takes_top_k else 1
    probs = logits.softmax(-1)
    top_p, chosen = probs.topk(k, dim=-1)
    if k > 1:
        weights = top_p / top_p.sum(-1, keepdim=True)
    elif top_p.requires_grad:
        # A renormalised top-1 weight is constantly 1 and carries no gradient; the straight-through form keeps
        # the value 1 exactly and lets the language-modelling loss reach the router.
        weights = (top_p - top_p.detach()) + 1
    else:  # no gradient wanted (generation): the same 1, one kernel rather than two
        weights = torch.ones_like(top_p)
    return Routing(probs, chosen, weights, logits)


def keep_state(state: dict, key: str, value: torch.Tensor) -> None:
    """state[key] = value, written in place where a tensor of that shape and dtype already sits there: mol.fast
    replays its steps as CUDA graphs, which read and write fixed buffers (a new tensor would go unseen)."""
    old = state.get(key)
    if (
        old is not None
        and old.shape == value.shape
        and old.dtype == value.dtype
        and old.device == value.device
    ):
        old.copy_(value)
    else:
        state[key] = value


def unit_rms(h: torch.Tensor) -> torch.Tensor:
    """The input at unit RMS (float32), so that one router works whatever the stream's scale."""
    return nn.functional.rms_norm(h.float(), (h.shape[-1],), None, 1e-6)  # one kernel, not five


@register_router
class TokenRouter(nn.Module):
    kind = "token"
    per_sequence = False
    takes_top_k = True

    def __init__(self, width: int, n_experts: int, top_k: int = 1):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.proj = nn.Linear(width, n_experts)
        nn.init.zeros_(self.proj.weight)  # uniform at start
        nn.init.zeros_(self.proj.bias)

    def features(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return unit_rms(h)

    def forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None = None, state: dict | None = None
    ) -> torch.Tensor:
        return self.proj(self.features(h))


@register_router
class PooledRouter(nn.Module):
    kind = "pooled"
    per_sequence = True
    takes_top_k = False
    top_k = 1

    def __init__(self, width: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.proj = nn.Linear(width, n_experts)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal running mean over real tokens: [B, T, width]."""
        x = unit_rms(h)
        m = torch.ones(x.shape[:2], device=x.device) if attention_mask is None else attention_mask.float()
        total = (x * m.unsqueeze(-1)).cumsum(1)
        count = m.cumsum(1).clamp(min=1).unsqueeze(-1)
        return total / count

    def forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None = None, state: dict | None = None
    ) -> torch.Tensor:
        """With `state` (generation), the first call decides from the whole prompt and later calls reuse it."""
        if state is None:
            return self.proj(self.features(h, attention_mask))
        if "logits" not in state:
            state["logits"] = self.proj(self.features(h, attention_mask)[:, -1])  # [B, n]: the whole prompt
        return state["logits"].unsqueeze(1).expand(-1, h.shape[1], -1)


@register_router
class EvidenceGate(nn.Module):
    """The lanes' output gate as a switching Bayesian mixture: each lane is weighted by how well it predicted the
    tokens read so far, recent ones counting most. Its input is each lane's log-probability of every input token
    ([B, T, lanes], 0 where nothing predicted it); the score of lane l at t is prior_l + scale * E_l(t), with
    E(t) = decay * E(t - 1) + e(t). It reads no hidden state, so text unlike any training text still goes to the
    lane that predicts it best (the mixture's loss is at most the best lane's plus log(lanes) and a switching cost).
    While generating, `state["evidence"]` holds E at the last token read."""

    kind = "evidence"
    per_sequence = False
    takes_top_k = False
    top_k = 1
    reads = "evidence"  # what the network feeds it: the lanes' log-probabilities of the tokens, not states

    def __init__(self, width: int, n_experts: int, decay: float = 0.8):
        super().__init__()
        self.n_experts = n_experts
        self.prior = nn.Parameter(torch.zeros(n_experts))
        self.scale = nn.Parameter(torch.ones(()))
        self.decay_logit = nn.Parameter(torch.logit(torch.tensor(decay)))

    @property
    def decay(self) -> torch.Tensor:
        return torch.sigmoid(self.decay_logit)

    def features(self, e: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return e

    @torch.no_grad()
    def uniform_(self) -> None:
        """No prior, and the evidence not counted: every lane equally likely."""
        self.prior.zero_()
        self.scale.zero_()

    def forward(
        self, e: torch.Tensor, attention_mask: torch.Tensor | None = None, state: dict | None = None
    ) -> torch.Tensor:
        e = e.float()
        if attention_mask is not None:
            e = e * attention_mask.unsqueeze(-1).to(e.dtype)
        q = e.shape[1]
        t = torch.arange(q, device=e.device, dtype=e.dtype)
        lag = t.unsqueeze(1) - t.unsqueeze(0)  # [t, s] = t - s
        log_decay = nn.functional.logsigmoid(self.decay_logit).float()
        weights = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_decay), torch.zeros_like(lag))
        evidence = torch.einsum("ts,bsl->btl", weights, e)  # sum over s <= t of decay^(t - s) e(s)
        if state is not None and "evidence" in state:  # what came before this step, decayed
            evidence = evidence + torch.exp((t + 1) * log_decay).view(1, q, 1) * state["evidence"].unsqueeze(
                1
            )
        if state is not None:
            keep_state(state, "evidence", evidence[:, -1].detach())
        return self.prior + self.scale * evidence


SimpleRouter = TokenRouter  # the name used by the first quick start


def load_balancing_loss(
    probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer form: N * sum_i f_i * P_i, where f_i is the fraction of (token, choice) assignments
    sent to expert i and P_i the mean gate probability of expert i, over the real tokens (`mask`). Equals 1 for
    perfectly uniform routing, 0 with no real token. Masked by weights rather than by selecting the real tokens:
    a selection's size is a host read, which would stall the device once per routed slot of every step."""
    n = probs.shape[-1]
    p = probs.reshape(-1, n).float()
    c = chosen.reshape(p.shape[0], -1)
    m = p.new_ones(p.shape[0]) if mask is None else mask.reshape(-1).to(p)
    f = p.new_zeros(n).scatter_add_(0, c.reshape(-1), m.unsqueeze(1).expand_as(c).reshape(-1))
    real = m.sum()
    f = f / (real * c.shape[1]).clamp(min=1)
    mean_p = (p * m.unsqueeze(1)).sum(0) / real.clamp(min=1)
    return n * (f * mean_p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps router logits small."""
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)
    if mask is not None:
        m = mask.float()
        return (z * m).sum() / m.sum().clamp(min=1)
    return z.mean()
