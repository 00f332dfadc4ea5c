"""Closed-form initialisation of the lanes' stitches, before training.

A stitch's gate starts at zero, so the fused model is unchanged whatever its map; but with a random map the gate's
first gradient, sum_t <dL/dh_t, map(x_t)>, reads an arbitrary direction, and the map itself gets no gradient
until the gate moves. Here each map is fitted on sample text instead, by ridge regression from what the stitch
reads (the source lane's state at unit RMS after slot `after[0]`) to the target lane's state at unit RMS after
slot `after[1]`, where its update is added: the part of the target's state the source predicts. A low-rank map
is the reduced-rank fit (the full fit projected onto the leading principal directions of its fitted values). A
cross-attention stitch keeps its queries and keys as built; its value and output maps are fitted the same way on
the source states its heads attend to (each head's map, of rank width / heads, fitted in turn to what the
earlier heads leave unexplained). Gates stay at zero: the fused model's outputs do not change.

"lstsq-gradient" fits the same maps to another target: -dL/dh, the fused model's loss gradient at the point where
the update is added (one backward pass on the sample), scaled to unit RMS. The gate's first gradient is
sum_t <dL/dh_t, map(x_t)>, so this is the map (in the least-squares sense) that makes opening the gate lower the
loss fastest; fitting the target's own state instead mostly re-adds what the stream already holds."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mol.data import DomainTokens
from mol.errors import DataError
from mol.fused import FusedModel
from mol.network.modeling_mol import CrossAttentionStitch
from mol.network.routers import unit_rms
from mol.router_init import _sample

STITCH_INITS = ("random", "lstsq", "lstsq-gradient")  # random: the maps as built


def ridge_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W [out, in] minimising |x W^T - y|^2 + ridge * mean(diag(x^T x)) |W|^2 (no bias: stitch maps have none;
    float64 normal equations)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    gram += ridge * (gram.diagonal().mean() + 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ y).T


def reduced_rank_map(
    x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, in], up [out, rank]) with up @ down the best rank-`rank` ridge map from x to y: the full fit
    projected onto the leading eigenvectors of its fitted values' second moment (zero-padded past its rank)."""
    w = ridge_map(x, y, ridge)
    fitted = x.double() @ w.T
    _, vectors = torch.linalg.eigh(fitted.T @ fitted)  # ascending eigenvalues
    up = vectors.flip(-1)[:, :rank]  # [out, <= rank]
    down = up.T @ w
    if up.shape[1] < rank:
        pad = rank - up.shape[1]
        up = torch.cat([up, up.new_zeros(up.shape[0], pad)], 1)
        down = torch.cat([down, down.new_zeros(pad, down.shape[1])], 0)
    return down, up


def _residual(y: torch.Tensor, pred: torch.Tensor) -> float:
    """|y - pred|^2 / |y|^2."""
    return float((y - pred).double().pow(2).sum() / y.double().pow(2).sum().clamp(min=1e-30))


@torch.no_grad()
def fit_stitch(
    stitch: torch.nn.Module,
    h_source: torch.Tensor,
    h_target: torch.Tensor,
    mask: torch.Tensor,
    ridge: float = 1e-3,
    aim: torch.Tensor | None = None,
):
    """Fit one stitch's map on paired states ([B, T, width] each, `mask` [B, T]) to `aim` (None: the target's
    state at unit RMS); returns its relative residual on them before and after the fit."""
    keep = mask.reshape(-1).bool().cpu()
    aim = unit_rms(h_target) if aim is None else aim
    y = aim.float().reshape(-1, aim.shape[-1]).cpu()[keep]

    def current() -> torch.Tensor:
        u = stitch.update(h_source, h_target, mask, None)
        return u.float().reshape(-1, u.shape[-1]).cpu()[keep]

    before = _residual(y, current())
    x = unit_rms(h_source).float()
    if isinstance(stitch, CrossAttentionStitch):
        probs = stitch.attention(h_source, h_target, mask)  # [B, heads, Q, K]
        d = stitch.value.weight.shape[0] // stitch.heads
        left = y.double()
        for head in range(stitch.heads):
            z = (probs[:, head] @ x).reshape(-1, x.shape[-1]).cpu()[keep]  # the source states this head reads
            down, up = reduced_rank_map(z, left, d, ridge)
            rows = slice(head * d, (head + 1) * d)
            stitch.value.weight[rows] = down.to(stitch.value.weight)
            stitch.out.weight[:, rows] = up.to(stitch.out.weight)
            left = left - z.double() @ (up @ down).T
    else:
        flat = x.reshape(-1, x.shape[-1]).cpu()[keep]
        if isinstance(stitch.map, torch.nn.Linear):
            stitch.map.weight.copy_(ridge_map(flat, y, ridge).to(stitch.map.weight))
        else:
            down, up = reduced_rank_map(flat, y, stitch.map[0].weight.shape[0], ridge)
            stitch.map[0].weight.copy_(down.to(stitch.map[0].weight))
            stitch.map[1].weight.copy_(up.to(stitch.map[1].weight))
    return {"before": before, "after": _residual(y, current())}


@torch.no_grad()
def fit_stitches(
    model: FusedModel,
    tokens: Mapping[str, DomainTokens],
    sample_tokens: int = 2048,
    seq_len: int = 256,
    ridge: float = 1e-3,
    aim: str = "state",
) -> dict[str, dict[str, float]]:
    """Fit every stitch of a lanes model on the first `sample_tokens` tokens of each stream (one forward pass:
    with every gate at zero, no stitch changes the states another reads). `aim`: what each update is fitted to,
    the target's state ("state") or the descent direction of the fused model's loss at the point where the
    update is added ("gradient": -dL/dh, scaled to unit RMS). Returns each stitch's relative residual
    |y - update|^2 / |y|^2 on the sample before and after."""
    if model.lanes is None or not len(model.stitches):
        return {}
    input_ids, _ = _sample(tokens, sample_tokens, seq_len)
    input_ids = input_ids.to(model.device)
    mask = torch.ones_like(input_ids)
    states: dict[tuple[str, int], torch.Tensor] = {}
    wanted = {(st.source, st.after[0]) for st in model.stitches} | {
        (st.target, st.after[1]) for st in model.stitches
    }

    probes: dict[tuple[str, int], torch.Tensor] = {}

    def keep(_m, _a, out, key):
        states[key] = out.detach()
        if aim == "gradient":  # a zero added where the stitch's update would be: its gradient is dL/dh there
            probes[key] = torch.zeros_like(out, requires_grad=True)
            return out + probes[key]
        return None

    hooks = [
        model.lanes[lane]
        .slots[i]
        .register_forward_hook(lambda m, a, out, key=(lane, i): keep(m, a, out, key))
        for lane, i in wanted
    ]
    was_training = model.training
    model.eval()
    try:
        if aim == "gradient":
            with torch.enable_grad():
                model(input_ids, mask, labels=input_ids, trace=False).loss.backward()
            for p in model.parameters():
                p.grad = None  # nothing of this pass may reach the optimizer
        else:
            ctx = model.context(mask, input_ids.shape[1], mask, None)
            model.run_lanes(input_ids, ctx)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    report = {}
    for k, st in enumerate(model.stitches):
        goal = None
        if aim == "gradient":
            goal = -probes[st.target, st.after[1]].grad
            goal = goal / goal.float().pow(2).mean().sqrt().clamp(min=1e-30)
        fit = fit_stitch(
            st, states[st.source, st.after[0]], states[st.target, st.after[1]], mask, ridge, goal
        )
        report[f"stitch {k} ({st.source} -> {st.target})"] = fit
    return report


def init_stitches(
    model: FusedModel, method: str, tokens: Mapping[str, DomainTokens] | None = None, **kwargs
) -> dict:
    """Initialise the stitches of `model` by `method` (random: as built; lstsq: fitted on `tokens`)."""
    if method == "random":
        return {}
    if method in ("lstsq", "lstsq-gradient"):
        if not tokens:
            raise DataError("Closed-form (lstsq) stitch initialisation needs sample text.")
        return fit_stitches(
            model, tokens, aim="gradient" if method == "lstsq-gradient" else "state", **kwargs
        )
    raise DataError(f"Unknown stitch initialisation '{method}'; use one of: {', '.join(STITCH_INITS)}.")
