"""Forward FLOPs per token of a plan, and of each of its sources alone.

Counted as 2 x the multiply-accumulates of every matrix product a token goes through (attention projections,
MLPs, adapters, routers, stitches, the lanes' gate, every head); embedding and position lookups are free, and
norms, activations and softmaxes are left out. The matrix products of a block are read from the weight shapes
the plan already checked against the config (every 2-D weight of the layer is one product per token), so gated
and plain MLPs, grouped-query attention and fused QKV projections count as they are; the family data says
which of them is the MLP (`Family.mlp`). Attention itself adds 2 x 2 x n x d_attn per attention layer (scores
and the weighted sum of values, d_attn = heads x head_dim) for a token that attends over n = min(context,
sliding window) earlier tokens, at the stated `context`.

How a recipe runs (DESIGN decision 5): in a token-routed slot every candidate's attention sees every token,
but only the top-k experts' MLPs run (an expert whose family has no separate MLP module runs whole); a
per-sequence slot runs one expert; a lanes recipe runs every lane, except that with a sequence mixture the
tokens generated after the prompt run only the chosen lane (and the lanes its stitches read from). Where the
experts of a slot differ in size, the mean expert is counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

DEFAULT_CONTEXT = 2048  # the context of the plan's memory estimate as well


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer's FLOPs per token: `mlp` the matrix products of its MLP module, `rest` those of
    everything else (attention projections; the whole layer where the family has no MLP module), `scores`
    attention's own term at the context."""

    rest: int
    mlp: int
    scores: int

    @property
    def total(self) -> int:
        return self.rest + self.mlp + self.scores


def _matmul_flops(src, prefix: str) -> int:
    """2 x the multiply-accumulates of the 2-D weights under `prefix` (one product per token each)."""
    total = 0
    for name, t in src.tensors.items():
        if name.startswith(prefix) and name.endswith("weight") and len(t.shape) == 2:
            total += 2 * t.shape[0] * t.shape[1]
    return total


def attention_width(src) -> int:
    """heads x head_dim of one query of `src`'s attention."""
    head_dim = getattr(src.config, "head_dim", None) or src.width // src.heads
    return src.heads * int(head_dim)


def layer_cost(src, index: int, context: int = DEFAULT_CONTEXT) -> LayerCost:
    from mol.planning import layer_window

    prefix = src.family.layer_prefix(index)
    whole = _matmul_flops(src, prefix)
    mlp = _matmul_flops(src, f"{prefix}{src.family.mlp}.") if src.family.mlp else 0
    window = layer_window(src.config, index)
    seen = context if window is None else min(context, window)
    return LayerCost(whole - mlp, mlp, 4 * seen * attention_width(src))


def readout_cost(src) -> int:
    """The head (a tied head is the embedding's shape) and the projections around the stack (OPT-350m)."""
    fam = src.family
    head = fam.head_in_files(src.tensors)
    rows, cols = src.tensors[f"{head or fam.embed}.weight"].shape
    around = sum(_matmul_flops(src, p + ".") for p in (fam.project_in, fam.project_out) if p)
    return 2 * rows * cols + around


def source_flops(src, context: int = DEFAULT_CONTEXT) -> int:
    """`src` alone: every layer and its head."""
    return sum(layer_cost(src, i, context).total for i in range(src.num_layers)) + readout_cost(src)


def adapter_flops(kind: str | None, base_width: int, block_width: int, rank: int | None) -> int:
    """Into the block and back out (mol.network.adapters): the bottleneck's fixed maps and its low-rank
    correction."""
    if kind is None:
        return 0
    full = 2 * 2 * base_width * block_width
    if kind == "bottleneck":
        r = min(rank or 64, base_width, block_width)
        return full + 2 * 2 * r * (base_width + block_width)
    return full


def _stream_parts(the_plan, context: int) -> Counter:
    """The parts of one stream (a single-stream plan, or one lane), FLOPs per token by kind."""
    parts: Counter = Counter()
    d, rank = the_plan.width, the_plan.recipe.adapter.rank
    parts["heads"] += readout_cost(the_plan.base)
    for sp in the_plan.slots:
        costs = [layer_cost(the_plan.sources[e.alias], e.layer, context) for e in sp.experts]
        adapters = [adapter_flops(e.adapter, d, e.width, rank) for e in sp.experts]
        router = sp.slot.router
        if router is None:
            c = costs[0]
            parts["blocks"] += c.rest + c.mlp
            parts["attention"] += c.scores
            parts["adapters"] += adapters[0]
            continue
        n = len(sp.experts)
        parts["routers"] += 2 * d * n
        if router.per_sequence:  # one expert runs: the mean one
            parts["blocks"] += sum(c.rest + c.mlp for c in costs) / n
            parts["attention"] += sum(c.scores for c in costs) / n
            parts["adapters"] += sum(adapters) / n
        else:  # every candidate's attention sees the token, the top-k's MLPs run
            k = min(router.top_k, n)
            parts["blocks"] += sum(c.rest for c in costs) + k * sum(c.mlp for c in costs) / n
            parts["attention"] += sum(c.scores for c in costs)
            parts["adapters"] += sum(adapters)
    return parts


def stitch_flops(the_plan, st) -> int:
    a, b = the_plan.lanes[st.source].width, the_plan.lanes[st.target].width
    return 2 * (a * b if st.type == "linear" else (st.rank or 64) * (a + b))


def plan_flops(the_plan, context: int = DEFAULT_CONTEXT) -> dict:
    """The recipe's forward FLOPs per token at `context`, beside each source's alone:

    {"context_tokens", "prompt", "generated", "parts" (of the prompt figure, by kind),
     "generated_by_lane" (a sequence mixture only), "sources": {alias: {"flops", "ratio", "generated_ratio"}}}

    "prompt" is a prompt token's (and a training token's), "generated" a generated token's: the same but for a
    sequence mixture, where it is the costliest lane's."""
    by_lane = None
    if the_plan.lanes:
        from mol.network.modeling_mol import _with_sources

        lanes = {n: _stream_parts(p, context) for n, p in the_plan.lanes.items()}
        stitches = [(st, stitch_flops(the_plan, st)) for st in the_plan.recipe.stitches]
        parts = sum(lanes.values(), Counter())
        parts["stitches"] += sum(f for _, f in stitches)
        mixture = the_plan.recipe.mixture
        if mixture is not None and mixture.type == "evidence":  # a decayed running sum per lane
            parts["gate"] += 4 * len(the_plan.lanes)
        else:
            parts["gate"] += 2 * sum(p.width for p in the_plan.lanes.values()) * len(the_plan.lanes)
        if mixture is not None and mixture.type == "sequence":
            by_lane = {}
            for name in lanes:  # the chosen lane, the lanes its stitches read from, the stitches into them
                run = _with_sources({name}, the_plan.recipe.stitches)
                by_lane[name] = round(
                    sum(sum(lanes[n].values()) for n in run)
                    + sum(f for st, f in stitches if st.target in run)
                )
    else:
        parts = _stream_parts(the_plan, context)
    prompt = round(sum(parts.values()))
    generated = max(by_lane.values()) if by_lane else prompt
    alone = {a: source_flops(s, context) for a, s in the_plan.sources.items()}
    out = {
        "context_tokens": context,
        "prompt": prompt,
        "generated": generated,
        "parts": {k: round(v) for k, v in parts.items() if v},
        "sources": {
            a: {"flops": f, "ratio": round(prompt / f, 4), "generated_ratio": round(generated / f, 4)}
            for a, f in alone.items()
        },
    }
    if by_lane is not None:
        out["generated_by_lane"] = by_lane
    return out


def fmt_flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.0f} FLOP"


def summary_lines(flops: dict) -> list[str]:
    """One or two lines for `Plan.summary()`."""
    ctx = flops["context_tokens"]
    by_lane = flops.get("generated_by_lane")
    if by_lane:
        low, high = min(by_lane.values()), max(by_lane.values())
        span = fmt_flops(high) if low == high else f"{fmt_flops(low)}–{fmt_flops(high)}"
        head = (
            f"FLOPs per token (forward, {ctx}-token context): {fmt_flops(flops['prompt'])} per prompt token, "
            f"{span} per generated token (the chosen lane)."
        )
        vs = [
            f"{a} {fmt_flops(s['flops'])} ({s['ratio']:.2f}x prompt, {s['generated_ratio']:.2f}x generated)"
            for a, s in flops["sources"].items()
        ]
    else:
        head = f"FLOPs per token (forward, {ctx}-token context): {fmt_flops(flops['prompt'])}."
        vs = [f"{a} {fmt_flops(s['flops'])} ({s['ratio']:.2f}x)" for a, s in flops["sources"].items()]
    return [head, "  vs each source alone: " + ", ".join(vs) + "."]
