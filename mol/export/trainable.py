"""The trainable parts of a fused model (adapters and routers) without its source blocks: named exactly as in
`FusedModel.trainable_state_dict()`, so trained weights load onto them with `mol.load_trainable`."""

from __future__ import annotations

import torch
from torch import nn

from mol.adapters import make_adapter
from mol.planning import Plan
from mol.routers import make_router


class TrainableParts(nn.Module):
    """slots[i].experts[j].adapter and slots[i].router, at their starting values (identity, uniform)."""

    def __init__(self, the_plan: Plan):
        super().__init__()
        width, rank = the_plan.width, the_plan.recipe.adapter.rank
        slots = []
        for sp in the_plan.slots:
            slot = nn.Module()
            slot.experts = nn.ModuleList()
            for e in sp.experts:
                holder = nn.Module()
                holder.adapter = make_adapter(e.adapter, width, e.width, rank) if e.adapter else None
                slot.experts.append(holder)
            slot.router = None
            if sp.routed:
                r = sp.slot.router
                slot.router = make_router(r.type, width, len(sp.experts), r.top_k)
            slots.append(slot)
        self.slots = nn.ModuleList(slots)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def adapters(self) -> dict[str, nn.Module]:
        """Expert name-path -> adapter, for every expert that has one."""
        return {
            f"slots.{i}.experts.{j}": h.adapter
            for i, s in enumerate(self.slots)
            for j, h in enumerate(s.experts)
            if h.adapter is not None
        }


@torch.no_grad()
def is_identity(adapter: nn.Module) -> bool:
    """True when the adapter maps the stream in and the update out unchanged (same width, untrained or reset)."""
    base, block = adapter.base_width, adapter.block_width
    if base != block:
        return False
    dtype = next(adapter.parameters()).dtype
    eye = torch.eye(base, dtype=dtype)
    return (
        torch.equal(adapter.into(eye), eye)
        and torch.equal(adapter.into(torch.zeros(1, base, dtype=dtype)), torch.zeros(1, base, dtype=dtype))
        and torch.equal(adapter.out(eye), eye)
    )
