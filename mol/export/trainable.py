"""The trainable parts of a fused model (adapters and routers) without reading its source blocks: the network
itself, built on the meta device with only its adapters and routers made (on the CPU, at their starting values),
so its names are the model's and trained weights load onto it with `mol.load_trainable`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mol.layout import network_config
from mol.planning import Plan

if TYPE_CHECKING:
    from mol.network.modeling_mol import MoLNetwork


def trainable_parts(the_plan: Plan) -> MoLNetwork:
    from mol.network.modeling_mol import MoLNetwork  # transformers' model classes: seconds to import

    with torch.device("meta"):
        return MoLNetwork(network_config(the_plan), init_device="cpu")


def parts_matter(the_plan: Plan, trained: bool) -> bool:
    """Whether an export needs the trainable parts at all. Not for a plain stack of the base's own layers with
    nothing trained: it has no adapters or routers, and its head is the base's; so that export (and mergekit
    export) never builds the network, nor imports its modelling code."""
    if trained or the_plan.lanes:
        return True
    return any(sp.routed or sp.experts[0].alias != the_plan.base.alias for sp in the_plan.slots)


@torch.no_grad()
def copy_trainable(parts: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set the adapters and routers of `parts` from another model's trainable state (same recipe); its final
    norm and head too where that model trained them."""
    if any(k in parts.head_names() for k in state):
        parts.train_head(requires_grad=False)
    own = parts.trainable_state_dict()
    for name, value in state.items():
        own[name].copy_(value.detach().to("cpu", own[name].dtype))


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
