"""The lanes' output mixture: log p(x) = log sum_l g_l softmax(z_l)(x), from each lane's logits z_l and the gate's
log-weights log g_l, in float32.

`mix` computes it from the lanes' log-probabilities with torch operations (any device, gradients). Over a whole
sequence that is several passes over [B, T, vocabulary] floats (each lane's log-softmax, the gate added, the
pairwise logaddexp): 5.3 ms of device time for two lanes of [8, 1024] tokens and a 32000-token vocabulary on an
H200. `fused_mix` computes the same from the lanes' raw logits in one Triton kernel per pair of lanes
(mol.network.kernels), each program one row: each lane's log-normaliser of the row, then the mixture written once,
0.94 ms. `log_normaliser` gives an evidence gate the lanes' log-probabilities of the tokens read without a
log-softmax over every position. Both run where mol.network.kernels.runs_on says."""

from __future__ import annotations

import torch

from . import kernels


def mix(logp: dict[str, torch.Tensor], scores: torch.Tensor, names: list[str]) -> torch.Tensor:
    """log sum_l softmax(scores)_l p_l(x): the lanes' distributions mixed by the gate, [B, T, V]."""
    log_gate = scores.float().log_softmax(-1)  # [B, T, lanes]
    out = None  # folded pairwise: a few passes over [B, T, V], where stacking the lanes first took many
    for i, n in enumerate(names):
        term = logp[n] + log_gate[..., i : i + 1].to(logp[n].device)
        out = term if out is None else torch.logaddexp(out, term)
    return out


def mix_logits(logits: list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """`mix` of the lanes' raw logits (in the order of the gate's `scores`' last dimension), through each lane's
    float32 log-softmax: what `fused_mix` computes, with torch's operations."""
    lanes = list(range(len(logits)))
    return mix(
        {i: z.log_softmax(-1, dtype=torch.float32) for i, z in zip(lanes, logits, strict=True)}, scores, lanes
    )


def _kernel_reads(z: torch.Tensor) -> bool:
    """Whether the kernels can read these logits now: [B, T, V], the last dimension contiguous, where they run."""
    return kernels.runs_on(z.device) and z.dim() == 3 and z.stride(-1) == 1


def can_fuse(logits: list[torch.Tensor]) -> bool:
    """Whether `fused_mix` can take these lanes' logits: each readable by the kernels, all of one shape and
    device."""
    first = logits[0]
    return all(_kernel_reads(z) and z.device == first.device and z.shape == first.shape for z in logits)


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """log sum_x exp(z(x)) of each row of `logits` ([B, T, V]), [B, T] float32: a row's log-softmax is its
    logits less this. One pass over the logits where the kernels run; elsewhere through a float32 copy."""
    if _kernel_reads(logits):
        return kernels.log_normalisers(logits)
    return torch.logsumexp(logits.float(), -1)


def fused_mix(logits: list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """The mixture, as `mix` computes it from the log-softmax of each of `logits` (the lanes' raw logits, in the
    order of the gate's `scores`' last dimension), [B, T, V] float32; where `can_fuse` says."""
    return kernels.mix_lanes(logits, scores.float().log_softmax(-1).to(logits[0].device))
