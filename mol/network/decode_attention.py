"""One-token attention (a decode step) as one Triton kernel that reads only the keys the mask lets through.

A fast decoder's static cache hands attention all of its capacity, the mask ruling out what is not written yet;
torch's SDPA reads every key, and for one query position its kernel is mostly latency. Here one program takes
one key-value head's query rows (its group of query heads, stacked, as mol.network.attention does for SDPA) over
a chunk of keys, and skips each block of keys the mask rules out entirely: the softmax over the keys it reads is
the softmax over all (a ruled-out key's weight is exp(-inf)).
The chunks of a cache run side by side, their partial softmaxes combined by a second kernel. A row the mask rules
out entirely (no key at all) gets zeros."""

from __future__ import annotations

import torch

from .kernels import on_its_device, triton

if triton is not None:
    import triton.language as tl

# Keys one program reads at most, keys it reads at once, its warps. On an H200, bfloat16, 8 query heads a key-value
# head of 64: 5.6-7.0 us for 40-200 of 384 keys (torch's SDPA 10.2), 11.0 for 1500 of 2048 (34.0); a chunk of 512
# is quicker for a few keys (4.6) but slower over more (8.6, 17.8). bench/perf: decode_profile.attention
CHUNK = 128
BLOCK_N = 64
NUM_WARPS = 4
MAX_HEAD_DIM = 256


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel takes this call: one query position [B, heads, 1, D] over keys and values [B, KV heads,
    N, D] whose KV heads divide the heads, each row's last dimension contiguous, one dtype; a mask of [B or 1, 1,
    1 or query rows, >= N] (additive or boolean); a head size up to MAX_HEAD_DIM."""
    return (
        query.dim() == key.dim() == value.dim() == 4
        and query.shape[-2] == 1
        and query.shape[1] % key.shape[1] == 0
        and key.shape == value.shape
        and query.shape[-1] == key.shape[-1] <= MAX_HEAD_DIM
        and query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and mask is not None
        and mask.dim() == 4
        and mask.shape[0] in (1, query.shape[0])
        and mask.shape[1] == 1
        and mask.shape[-1] >= key.shape[2]
    )


@on_its_device
def decode_attention(
    rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(rows @ key^T * scale + mask) @ value for `rows` [B, KV heads, queries per head, D] over `key`,
    `value` [B, KV heads, N, D]; `mask` [B, 1, *, >= N]: added (float) or keys allowed (bool), its first row's
    first N columns read. [B, KV heads, queries per head, D] in the query's dtype."""
    b, kv_heads, groups, d = rows.shape
    n = key.shape[2]
    out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    if out.numel() == 0:
        return out
    splits = triton.cdiv(n, CHUNK)
    is_bool = mask.dtype == torch.bool
    masked_at = float("-inf") if is_bool else torch.finfo(mask.dtype).min  # an added value that rules out
    partial = (
        torch.empty(b * kv_heads, splits, groups, d + 2, dtype=torch.float32, device=rows.device)
        if splits > 1
        else out
    )
    g_block = max(16, triton.next_power_of_2(groups))
    d_block = max(16, triton.next_power_of_2(d))
    _attend_chunk[(b * kv_heads, splits)](
        out,
        partial,
        rows,
        key,
        value,
        mask,
        *rows.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        mask.stride(0) if mask.shape[0] > 1 else 0,
        mask.stride(3),
        *out.stride()[:3],
        kv_heads,
        groups,
        n,
        d,
        scale,
        masked_at,
        G=g_block,
        D=d_block,
        BLOCK=BLOCK_N,
        CHUNK=CHUNK,
        SPLIT=splits > 1,
        BOOL_MASK=is_bool,
        IEEE=rows.dtype == torch.float32,
        num_warps=NUM_WARPS,
    )
    if splits > 1:
        _combine_chunks[(b * kv_heads,)](
            out, partial, *out.stride()[:3], kv_heads, groups, d, splits, G=g_block, D=d_block
        )
    return out


if triton is not None:

    @triton.jit
    def _attend_chunk(
        out,
        partial,
        q,
        k,
        v,
        mask,
        q_sb,
        q_sh,
        q_sg,
        k_sb,
        k_sh,
        k_sn,
        v_sb,
        v_sh,
        v_sn,
        m_sb,
        m_sn,
        o_sb,
        o_sh,
        o_sg,
        kv_heads,
        groups,
        n,
        d,
        scale,
        masked_at,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
        SPLIT: tl.constexpr,
        BOOL_MASK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One key-value head's query rows over one chunk of keys: an online softmax over the blocks the mask
        lets any key of through; the normalised result (one chunk), or its running max, sum and weighted values
        for `_combine_chunks`."""
        pair = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        b = pair // kv_heads
        h = pair % kv_heads
        g = tl.arange(0, G)[:, None]
        dd = tl.arange(0, D)[None, :]
        q_ok = (g < groups) & (dd < d)
        qt = tl.load(q + b * q_sb + h * q_sh + g * q_sg + dd, mask=q_ok, other=0.0)
        top = tl.full([G], float("-inf"), tl.float32)
        total = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        start = chunk * CHUNK
        for lo in range(start, tl.minimum(start + CHUNK, n), BLOCK):
            cols = lo + tl.arange(0, BLOCK)
            inside = cols < n
            if BOOL_MASK:
                allowed = tl.load(mask + b * m_sb + cols * m_sn, mask=inside, other=0) != 0
                bias = tl.zeros([BLOCK], tl.float32)
            else:
                bias = tl.load(mask + b * m_sb + cols * m_sn, mask=inside, other=float("-inf")).to(tl.float32)
                allowed = inside & (bias > masked_at)
            if tl.max(allowed.to(tl.int32), 0) > 0:  # a block the mask rules out entirely is not read
                kv_ok = allowed[:, None] & (dd < d)
                kt = tl.load(k + b * k_sb + h * k_sh + cols[:, None] * k_sn + dd, mask=kv_ok, other=0.0)
                if IEEE:
                    scores = tl.dot(qt, tl.trans(kt), input_precision="ieee")
                else:
                    scores = tl.dot(qt, tl.trans(kt))
                scores = tl.where(allowed[None, :], scores * scale + bias[None, :], float("-inf"))
                new_top = tl.maximum(top, tl.max(scores, 1))
                p = tl.exp(scores - new_top[:, None])
                fade = tl.exp(top - new_top)
                total = total * fade + tl.sum(p, 1)
                vt = tl.load(v + b * v_sb + h * v_sh + cols[:, None] * v_sn + dd, mask=kv_ok, other=0.0)
                if IEEE:
                    acc = acc * fade[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * fade[:, None] + tl.dot(p.to(vt.dtype), vt)
                top = new_top
        if SPLIT:  # [pairs, chunks, groups, D + 2]: the weighted values, the running max, the sum
            rows = partial + ((pair * tl.num_programs(1) + chunk) * groups) * (d + 2)
            tl.store(rows + g * (d + 2) + dd, acc, mask=q_ok)
            r = tl.arange(0, G)
            tl.store(rows + r * (d + 2) + d, top, mask=r < groups)
            tl.store(rows + r * (d + 2) + d + 1, total, mask=r < groups)
        else:
            result = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
            tl.store(out + b * o_sb + h * o_sh + g * o_sg + dd, result.to(out.dtype.element_ty), mask=q_ok)

    @triton.jit
    def _combine_chunks(
        out, partial, o_sb, o_sh, o_sg, kv_heads, groups, d, splits, G: tl.constexpr, D: tl.constexpr
    ):
        """One key-value head's rows: its chunks' partial softmaxes rescaled to their common max and summed."""
        pair = tl.program_id(0).to(tl.int64)
        b = pair // kv_heads
        h = pair % kv_heads
        g = tl.arange(0, G)[:, None]
        dd = tl.arange(0, D)[None, :]
        ok = (g < groups) & (dd < d)
        top = tl.full([G], float("-inf"), tl.float32)
        total = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        r = tl.arange(0, G)
        for s in range(0, splits):
            rows = partial + ((pair * splits + s) * groups) * (d + 2)
            part = tl.load(rows + g * (d + 2) + dd, mask=ok, other=0.0)
            part_top = tl.load(rows + r * (d + 2) + d, mask=r < groups, other=float("-inf"))
            part_total = tl.load(rows + r * (d + 2) + d + 1, mask=r < groups, other=0.0)
            new_top = tl.maximum(top, part_top)
            live = new_top > float("-inf")  # (no key in either yet: exp(-inf - -inf) would be NaN)
            fade = tl.where(live, tl.exp(top - new_top), 0.0)
            gain = tl.where(live, tl.exp(part_top - new_top), 0.0)
            total = total * fade + part_total * gain
            acc = acc * fade[:, None] + part * gain[:, None]
            top = new_top
        result = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
        tl.store(out + b * o_sb + h * o_sh + g * o_sg + dd, result.to(out.dtype.element_ty), mask=ok)
