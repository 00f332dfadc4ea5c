"""Hand-written Triton kernels for the work between the matrix products that torch runs as several small kernels
(each a launch and a pass over memory): the lanes' output mixture (mol.network.mixing), an RMSNorm in each of
its forms (mol.network.fusing), an attention layer's rotary embedding with its cache write (mol.network.rotary)
and a gated MLP's activation (mol.network.gated_mlp); mol.network.decode_attention holds one more. They run
where `runs_on` says: a CUDA device with Triton (torch's CUDA wheels bring it), no gradient wanted (they have no
backward), not under torch.compile (which fuses the same work itself); elsewhere their callers run the torch
operations they stand for. Triton compiles each kernel once per process on first use (a second or so) and keeps
it on disk."""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without Triton
    triton = None

# Columns a program of the mixture reads at once: 0.94 ms for two lanes of [8, 1024, 32000] on an H200, 1.23 at 4096
BLOCK = 1024


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device` (Triton and CUDA)."""
    return triton is not None and device.type == "cuda"


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on `device` now."""
    return available(device) and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def on_its_device(fn):
    """`fn` run with its first tensor's CUDA device current: Triton launches a kernel on the current device, which
    is not the tensors' where a model is placed over several GPUs."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = args[0][0] if isinstance(args[0], list | tuple) else args[0]
        index = first.device.index
        if first.device.type != "cuda" or index is None or index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return run


def _block(v: int) -> int:
    return min(BLOCK, triton.next_power_of_2(v))


# ---- the lanes' mixture --------------------------------------------------------------------------------------
@on_its_device
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


@on_its_device
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


@on_its_device
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


# ---- rotary embedding -----------------------------------------------------------------------------------------
@on_its_device
def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' rotary embedding (`x * cos + rotate_half(x) * sin`, rounded as its operations round) of
    `q` [B, T, H, D] and `k` [B, T, KV heads, D] (the last dimension contiguous) by `cos`, `sin` [B or 1, T, D]:
    (q, k) rotated, [B, T, heads, D] each, in one kernel where torch takes ten."""
    b, t, _, d = k.shape
    k_out = torch.empty(k.shape, dtype=torch.result_type(k, cos), device=k.device)
    return _rotary(
        q, k, None, cos, sin, k_out, None, None, k_out.stride(0), k_out.stride(2), k_out.stride(1)
    ), k_out


@on_its_device
def rotate_into(
    q, k, v, cos, sin, keys: torch.Tensor, values: torch.Tensor, write: torch.Tensor
) -> torch.Tensor:
    """`rotate`, with k rotated and `v` [B, T, KV heads, D] written into a cache's `keys`, `values` [B, KV heads,
    capacity, D] at the positions `write` [T] (what the cache's update does, in the same kernel): q rotated."""
    return _rotary(q, k, v, cos, sin, keys, values, write, keys.stride(0), keys.stride(1), keys.stride(2))


def _rotary(q, k, v, cos, sin, k_out, v_out, write, ko_sb, ko_sh, ko_st) -> torch.Tensor:
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    q_out = torch.empty(q.shape, dtype=torch.result_type(q, cos), device=q.device)
    if b * t == 0:
        return q_out
    vs = v.stride() if v is not None else (0, 0, 0, 0)
    vo = (v_out.stride(0), v_out.stride(1), v_out.stride(2)) if v_out is not None else (0, 0, 0)
    _rotary_rows[(b * t,)](
        q_out,
        k_out,
        v_out if v_out is not None else k_out,
        q,
        k,
        v if v is not None else k,
        cos,
        sin,
        write if write is not None else q_out,
        t,
        *q.stride()[:3],
        *k.stride()[:3],
        *vs[:3],
        *cos.stride()[:2],
        *sin.stride()[:2],
        q_out.stride(0),
        q_out.stride(1),
        ko_sb,
        ko_sh,
        ko_st,
        *vo,
        heads,
        kv_heads,
        d // 2,
        HEADS=triton.next_power_of_2(heads),
        KV_HEADS=triton.next_power_of_2(kv_heads),
        HALF=triton.next_power_of_2(d // 2),
        WRITE=write is not None,
    )
    return q_out


# ---- a gated MLP's activation ---------------------------------------------------------------------------------
@on_its_device
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (`gate`, `up` [..., I] of one dtype, each row's last dimension contiguous, as slices of a
    fused gate/up product are), in one kernel where torch takes two."""
    width = gate.shape[-1]
    g, u = (t.reshape(-1, width) for t in (gate, up))
    g, u = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, u))
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if g.shape[0] and width:
        block = min(BLOCK, triton.next_power_of_2(width))
        _silu_mul_rows[(g.shape[0], triton.cdiv(width, block))](
            out, g, u, g.stride(0), u.stride(0), width, BLOCK=block
        )
    return out.view(gate.shape)


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

    @triton.jit
    def _rotated_heads(src, sh, heads, c1, s1, c2, s2, half, ROWS: tl.constexpr, HALF: tl.constexpr, OUT):
        """One token's heads rotated, in two halves: x1 cos - x2 sin and x2 cos + x1 sin, each product rounded to
        the result's dtype before the sum (as torch's x * cos + rotate_half(x) * sin rounds them)."""
        h = tl.arange(0, ROWS)[:, None]
        c = tl.arange(0, HALF)[None, :]
        ok = (h < heads) & (c < half)
        x1 = tl.load(src + h * sh + c, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + h * sh + half + c, mask=ok, other=0.0).to(tl.float32)
        o1 = (x1 * c1).to(OUT).to(tl.float32) - (x2 * s1).to(OUT).to(tl.float32)
        o2 = (x2 * c2).to(OUT).to(tl.float32) + (x1 * s2).to(OUT).to(tl.float32)
        return o1.to(OUT), o2.to(OUT), h, c, ok

    @triton.jit
    def _rotary_rows(
        q_out,
        k_out,
        v_out,
        q,
        k,
        v,
        cos,
        sin,
        write,
        t,
        q_sb,
        q_st,
        q_sh,
        k_sb,
        k_st,
        k_sh,
        v_sb,
        v_st,
        v_sh,
        cos_sb,
        cos_st,
        sin_sb,
        sin_st,
        qo_sb,
        qo_st,
        ko_sb,
        ko_sh,
        ko_st,
        vo_sb,
        vo_sh,
        vo_st,
        heads,
        kv_heads,
        half,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        WRITE: tl.constexpr,
    ):
        """One token: its query heads rotated into q_out, its key heads into k_out at its position (`write`'s
        entry for it where WRITE, else its own), and where WRITE its value heads copied into v_out there too."""
        r = tl.program_id(0).to(tl.int64)
        b = r // t
        i = r % t
        pos = i
        if WRITE:
            pos = tl.load(write + i).to(tl.int64)
        p = tl.arange(0, HALF)[None, :]
        on = p < half
        cs = cos + b * cos_sb + i * cos_st
        sn = sin + b * sin_sb + i * sin_st
        c1 = tl.load(cs + p, mask=on, other=0.0).to(tl.float32)
        c2 = tl.load(cs + half + p, mask=on, other=0.0).to(tl.float32)
        s1 = tl.load(sn + p, mask=on, other=0.0).to(tl.float32)
        s2 = tl.load(sn + half + p, mask=on, other=0.0).to(tl.float32)
        out = q_out.dtype.element_ty
        o1, o2, h, c, ok = _rotated_heads(
            q + b * q_sb + i * q_st, q_sh, heads, c1, s1, c2, s2, half, HEADS, HALF, out
        )
        dst = q_out + b * qo_sb + i * qo_st + h * (2 * half) + c
        tl.store(dst, o1, mask=ok)
        tl.store(dst + half, o2, mask=ok)
        out = k_out.dtype.element_ty
        src = k + b * k_sb + i * k_st
        o1, o2, h, c, ok = _rotated_heads(src, k_sh, kv_heads, c1, s1, c2, s2, half, KV_HEADS, HALF, out)
        dst = k_out + b * ko_sb + pos * ko_st + h * ko_sh + c
        tl.store(dst, o1, mask=ok)
        tl.store(dst + half, o2, mask=ok)
        if WRITE:
            src = v + b * v_sb + i * v_st + h * v_sh + c
            dst = v_out + b * vo_sb + pos * vo_st + h * vo_sh + c
            tl.store(dst, tl.load(src, mask=ok), mask=ok)
            tl.store(dst + half, tl.load(src + half, mask=ok), mask=ok)

    @triton.jit
    def _silu_mul_rows(out, gate, up, g_st, u_st, width, BLOCK: tl.constexpr):
        """One row of silu(gate) * up, each rounded to the result's dtype as torch's two operations round it."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        g = tl.load(gate + r * g_st + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(up + r * u_st + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)
        tl.store(out + r * width + cols, (act * u).to(out.dtype.element_ty), mask=ok)
