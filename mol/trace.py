"""Routing trace: what every routed slot decided for every token of one forward pass or generation. It is
returned by the call that made it (`MoLOutput.trace`, `generate(..., return_trace=True).trace`), never kept on
the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SlotTrace:
    """One routed slot. `probs` is [batch, tokens, n_experts] (gate probabilities after softmax, before top-k);
    `chosen` is [batch, tokens, k] (expert indices, best first). For a pooled router every token of a sequence
    carries the sequence's decision."""

    slot: int
    experts: list[str]
    router: str  # "token" | "pooled"
    probs: torch.Tensor
    chosen: torch.Tensor

    def load(self, attention_mask: torch.Tensor | None = None) -> list[float]:
        """Fraction of (real, unpadded) tokens routed to each expert, counting every top-k choice."""
        n = len(self.experts)
        chosen = self.chosen
        if attention_mask is not None:
            chosen = chosen[attention_mask[:, -chosen.shape[1] :].bool()]
        counts = torch.bincount(chosen.reshape(-1).long(), minlength=n).float()
        total = counts.sum().clamp(min=1)
        return (counts / total).tolist()


@dataclass
class Trace:
    """Per routed slot, per token: gate probabilities and chosen experts. `token_ids` is [batch, tokens]."""

    token_ids: torch.Tensor | None = None
    slots: list[SlotTrace] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None

    def expert_load(self) -> dict[int, list[float]]:
        return {s.slot: s.load(self.attention_mask) for s in self.slots}

    def to_dict(self, batch_index: int = 0, tokens: list[str] | None = None) -> dict:
        """JSON-safe view of one sequence: the format the studio stores and plots.

        {"tokens": [str], "token_ids": [int], "slots": [{"slot": int, "router": str, "experts": [str],
        "probs": [[float]*n_experts]*T, "chosen": [[int]*k]*T, "load": [float]*n_experts}]}"""
        ids = self.token_ids[batch_index].tolist() if self.token_ids is not None else []
        keep = None
        if self.attention_mask is not None:
            keep = self.attention_mask[batch_index].bool()
            ids = [i for i, k in zip(ids, keep.tolist(), strict=True) if k]
        out_slots = []
        for s in self.slots:
            p, c = s.probs[batch_index], s.chosen[batch_index]
            if keep is not None:
                p, c = p[keep[-p.shape[0] :]], c[keep[-c.shape[0] :]]
            n = len(s.experts)
            counts = torch.bincount(c.reshape(-1).long(), minlength=n).float()
            out_slots.append(
                {
                    "slot": s.slot,
                    "router": s.router,
                    "experts": list(s.experts),
                    "probs": [[round(float(x), 5) for x in row] for row in p.tolist()],
                    "chosen": c.tolist(),
                    "load": (counts / counts.sum().clamp(min=1)).tolist(),
                }
            )
        return {
            "tokens": tokens if tokens is not None else [str(i) for i in ids],
            "token_ids": ids,
            "slots": out_slots,
        }
