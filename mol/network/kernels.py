"""Hand-written Triton kernels for the work between the matrix products that torch runs as several small kernels
(each a launch and a pass over memory): the lanes' output mixture (mol.network.mixing) and an RMSNorm in each of
its forms (mol.network.fusing). They run where `runs_on` says: a CUDA device with Triton (torch's CUDA wheels
bring it), no gradient wanted (they have no backward), not under torch.compile (which fuses the same work
itself); elsewhere their callers run the torch operations they stand for. Triton compiles each kernel once per
process on first use (a second or so) and keeps it on disk."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without Triton
    triton = None

# Columns a program of the mixture reads at once: 0.94 ms for two lanes of [8, 1024, 32000] on an H200, 1.23 at 4096
BLOCK = 1024


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on `device` now."""
    return (
        triton is not None
        and device.type == "cuda"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _block(v: int) -> int:
    return min(BLOCK, triton.next_power_of_2(v))


# ---- the lanes' mixture --------------------------------------------------------------------------------------
def mix_lanes(logits: list[torch.Tensor], log_gate: torch.Tensor) -> torch.Tensor:
    """log sum_l exp(log_gate_l + log_softmax(logits_l)), [B, T, V] float32: `logits` [B, T, V] each (the last
    dimension contiguous), `log_gate` [B, T, lanes]."""
    b, t, v = logits[0].shape
    log_gate = log_gate.float().reshape(b * t, -1).contiguous()
    out = torch.empty(b, t, v, dtype=torch.float32, device=logits[0].device)
    if b * t == 0 or v == 0:
        return out
    for i in range(0, len(logits), 2):  # lanes by pairs, each pair's terms added into what the last left
        first = logits[i]
        second = logits[i + 1] if i + 1 < len(logits) else first
        _mix_pair[(b * t,)](
            out,
            first,
            second,
            log_gate,
            i,
            t,
            v,
            first.stride(0),
            first.stride(1),
            second.stride(0),
            second.stride(1),
            log_gate.shape[1],
            HAS_SECOND=i + 1 < len(logits),
            ADD_TO_OUT=i > 0,
            BLOCK=_block(v),
        )
    return out


def log_normalisers(logits: torch.Tensor) -> torch.Tensor:
    """log sum_x exp(z(x)) of each row of `logits` ([B, T, V], the last dimension contiguous), [B, T] float32."""
    b, t, v = logits.shape
    out = torch.empty(b, t, dtype=torch.float32, device=logits.device)
    if b * t and v:
        _normaliser_rows[(b * t,)](out, logits, t, v, logits.stride(0), logits.stride(1), BLOCK=_block(v))
    return out


# ---- RMSNorm --------------------------------------------------------------------------------------------------
# mol.network.fusing.RMS_FORMS by number: how the weight is applied around the float32 normalisation
FORMS = {"scale_after_cast": 0, "scale_before_cast": 1, "one_plus_weight": 2}
MAX_NORM_WIDTH = 16384  # a row is held in one program's registers; wider rows take torch's form


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, form: str) -> torch.Tensor:
    """The RMSNorm of `x` over its last dimension in `form`, with the dtype torch's operations of that form give."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    dtype = torch.result_type(weight, x) if form == "scale_after_cast" else x.dtype
    out = torch.empty(rows.shape, dtype=dtype, device=x.device)
    if rows.shape[0] and d:
        _rms_rows[(rows.shape[0],)](
            out,
            rows,
            weight,
            rows.stride(0),
            d,
            eps,
            FORM=FORMS[form],
            BLOCK=triton.next_power_of_2(d),
            num_warps=min(16, max(1, d // 512)),
        )
    return out.view(*x.shape[:-1], d)


if triton is not None:

    @triton.jit
    def _log_normaliser(row, v, BLOCK: tl.constexpr):
        """log sum_x exp(z(x)) of one row of logits, in float32 (a running maximum keeps exp in range)."""
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, v, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(row + cols, mask=cols < v, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, z)
            seen = new_top > float("-inf")  # (where nothing finite came yet, exp(-inf - -inf) would be NaN)
            total = tl.where(seen, total * tl.exp(top - new_top) + tl.exp(z - new_top), 0.0)
            top = new_top
        peak = tl.max(top, 0)
        total = tl.sum(tl.where(top > float("-inf"), total * tl.exp(top - peak), 0.0), 0)
        return peak + tl.log(total)

    @triton.jit
    def _normaliser_rows(out, logits, t, v, sb, st, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        tl.store(out + r, _log_normaliser(logits + (r // t) * sb + (r % t) * st, v, BLOCK))

    @triton.jit
    def _log_add(a, b):
        top = tl.maximum(a, b)
        both_none = top == float("-inf")
        return tl.where(both_none, top, top + tl.log(tl.exp(a - top) + tl.exp(b - top)))

    @triton.jit
    def _mix_pair(
        out,
        first,
        second,
        log_gate,
        lane,
        t,
        v,
        first_sb,
        first_st,
        second_sb,
        second_st,
        lanes,
        HAS_SECOND: tl.constexpr,
        ADD_TO_OUT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row of the mixture for lanes `lane` (and `lane + 1`): each term log g_l + z_l - log sum exp z_l,
        logaddexp'd together (and to what `out` holds)."""
        r = tl.program_id(0).to(tl.int64)
        first_row = first + (r // t) * first_sb + (r % t) * first_st
        second_row = second + (r // t) * second_sb + (r % t) * second_st
        out_row = out + r * v
        shift_first = tl.load(log_gate + r * lanes + lane) - _log_normaliser(first_row, v, BLOCK)
        shift_second = 0.0
        if HAS_SECOND:
            shift_second = tl.load(log_gate + r * lanes + lane + 1) - _log_normaliser(second_row, v, BLOCK)
        for start in range(0, v, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < v
            term = tl.load(first_row + cols, mask=ok, other=0.0).to(tl.float32) + shift_first
            if HAS_SECOND:
                z = tl.load(second_row + cols, mask=ok, other=0.0).to(tl.float32)
                term = _log_add(term, z + shift_second)
            if ADD_TO_OUT:
                term = _log_add(tl.load(out_row + cols, mask=ok, other=0.0), term)
            tl.store(out_row + cols, term, mask=ok)

    @triton.jit
    def _rms_rows(out, x, w, stride, d, eps, FORM: tl.constexpr, BLOCK: tl.constexpr):
        """One row: x / rms(x) in float32, the weight applied as FORM applies it, rounded as torch rounds it."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < d
        v = tl.load(x + r * stride + cols, mask=ok, other=0.0).to(tl.float32)
        normed = v * tl.rsqrt(tl.sum(v * v, 0) / d + eps)
        g = tl.load(w + cols, mask=ok, other=0.0)
        if FORM == 0:  # w * normed.to(x.dtype): the product in the promoted dtype
            y = g.to(tl.float32) * normed.to(x.dtype.element_ty).to(tl.float32)
        elif FORM == 1:  # (w * normed).to(x.dtype)
            y = g.to(tl.float32) * normed
        else:  # (normed * (1 + w.float())).to(x.dtype)
            y = normed * (1.0 + g.to(tl.float32))
        tl.store(out + r * d + cols, y.to(out.dtype.element_ty), mask=ok)
