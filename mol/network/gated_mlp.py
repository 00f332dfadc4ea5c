"""Gated MLPs of the Llama form (`down_proj(silu(gate_proj(x)) * up_proj(x))`: Llama, Mistral, Qwen2 and 3,
Granite) with their activation and product in one kernel (mol.network.kernels.silu_mul, where torch runs two),
reading the gate and up halves of their fused product (mol.network.fusing) where they are. `fused_mlp` swaps
such a module for one of a subclass of its own class (mol.network.subclassing): the hooks a routed slot puts on
it (TokenSubset) stay; its class's own forward runs on the CPU, under torch.compile, with a gradient wanted."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .subclassing import same_to_rounding, swapped_where_same


class Gated(nn.Module):
    """Mixed in before a Llama-form MLP class: its forward, with silu(gate) * up as one kernel where it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not kernels.runs_on(x.device):
            return super().forward(x)
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


def fused_mlp(module: nn.Module) -> nn.Module:
    """`module` as its gated subclass where it has Linear gate, up and down projections, sits where the kernel
    runs and gives its own outputs on a probe (its activation is SiLU); otherwise `module`."""
    if isinstance(module, Gated) or hasattr(module, "_hf_hook") or module.training:
        return module
    projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections) or not hasattr(module, "act_fn"):
        return module
    w = projections[0].weight
    if not kernels.available(w.device):
        return module
    x = torch.randn(1, 3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype) * 3

    def same(fused) -> bool:
        with torch.no_grad():  # (the forwards called directly: no hooks of the module run)
            return same_to_rounding(Gated.forward(fused, x), type(module).forward(module, x))

    return swapped_where_same(module, Gated, same)
