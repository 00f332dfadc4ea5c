"""Adapters carry the base stream into a foreign block and its update back:

    out = h + A_out(B(A_in h) - A_in h)

Identity at start where widths match (a one-expert recipe reproduces its model exactly); a truncated identity
where they differ, replaced by least squares on paired activations by `mol.calibrate` (closed form)."""

from __future__ import annotations

import torch
from torch import nn


def truncated_identity(rows: int, cols: int) -> torch.Tensor:
    return torch.eye(rows, cols)


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising |x W^T + b - y|^2 + ridge |W|^2 (float64 normal equations, centred so b is unpenalised)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    gram += ridge * (gram.diagonal().mean() + 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xc.T @ yc).T  # [out, in]
    b = my - w @ mx
    return w.float(), b.float()


class LinearAdapter(nn.Module):
    """Full linear maps in and out of the source block's width."""

    def __init__(self, base_width: int, block_width: int):
        super().__init__()
        self.base_width, self.block_width = base_width, block_width
        self.into_block = nn.Linear(base_width, block_width)
        self.out_of_block = nn.Linear(block_width, base_width)
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        self.into_block.weight.copy_(truncated_identity(self.block_width, self.base_width))
        self.out_of_block.weight.copy_(truncated_identity(self.base_width, self.block_width))
        self.into_block.bias.zero_()
        self.out_of_block.bias.zero_()

    def into(self, h: torch.Tensor) -> torch.Tensor:
        return self.into_block(h)

    def out(self, delta: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(delta, self.out_of_block.weight)  # a delta carries no bias

    def add_out(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """h + out(delta), the add done inside the matrix product where the dtypes allow (one kernel, not two)."""
        w = self.out_of_block.weight
        if h.dtype == delta.dtype == w.dtype and not torch.is_autocast_enabled(h.device.type):
            flat = torch.addmm(h.reshape(-1, h.shape[-1]), delta.reshape(-1, delta.shape[-1]), w.t())
            return flat.view(h.shape)
        return h + self.out(delta)

    @torch.no_grad()
    def fit(self, h_base: torch.Tensor, h_block: torch.Tensor) -> None:
        """Least squares from paired activations: base stream -> block stream, and back for the update."""
        w, b = least_squares(h_base, h_block)
        self.into_block.weight.copy_(w)
        self.into_block.bias.copy_(b)
        w_back, _ = least_squares(h_block, h_base)
        self.out_of_block.weight.copy_(w_back)
        self.out_of_block.bias.zero_()


class BottleneckAdapter(nn.Module):
    """A fixed (calibrated) projection plus a trainable low-rank correction: few trainable parameters."""

    fixed = ("into_base", "into_bias", "out_base")  # set by calibration (least squares), never by training

    def __init__(self, base_width: int, block_width: int, rank: int = 64):
        super().__init__()
        self.base_width, self.block_width, self.rank = base_width, block_width, rank
        self.into_base = nn.Parameter(truncated_identity(block_width, base_width), requires_grad=False)
        self.into_bias = nn.Parameter(torch.zeros(block_width), requires_grad=False)
        self.out_base = nn.Parameter(truncated_identity(base_width, block_width), requires_grad=False)
        r_in, r_out = min(rank, base_width, block_width), min(rank, base_width, block_width)
        self.into_down = nn.Linear(base_width, r_in, bias=False)
        self.into_up = nn.Linear(r_in, block_width, bias=False)
        self.out_down = nn.Linear(block_width, r_out, bias=False)
        self.out_up = nn.Linear(r_out, base_width, bias=False)
        nn.init.zeros_(
            self.into_up.weight
        )  # the correction starts at zero: the adapter starts as its base map
        nn.init.zeros_(self.out_up.weight)

    def into(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.into_base, self.into_bias) + self.into_up(self.into_down(h))

    def out(self, delta: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(delta, self.out_base) + self.out_up(self.out_down(delta))

    def add_out(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return h + self.out(delta)

    @torch.no_grad()
    def fit(self, h_base: torch.Tensor, h_block: torch.Tensor) -> None:
        w, b = least_squares(h_base, h_block)
        self.into_base.copy_(w)
        self.into_bias.copy_(b)
        w_back, _ = least_squares(h_block, h_base)
        self.out_base.copy_(w_back)
        nn.init.zeros_(self.into_up.weight)
        nn.init.zeros_(self.out_up.weight)


def make_adapter(kind: str, base_width: int, block_width: int, rank: int | None = None) -> nn.Module:
    if kind == "bottleneck":
        return BottleneckAdapter(base_width, block_width, rank or 64)
    return LinearAdapter(base_width, block_width)
