"""A result JSON of the suite as Markdown (the tables of bench/README.md)."""

from __future__ import annotations

from bench.perf.targets import dig


def _x(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _compiled_training(t: dict) -> str:
    parts = []
    for key, label in (
        ("compiled", "every source block compiled"),
        ("compiled_network", "the whole step compiled (`mol train --compile`)"),
    ):
        c = t.get(key, {})
        if "tokens_per_s" in c:
            parts.append(
                f"{label}: {c['tokens_per_s']:.0f} tokens/s, MFU {_x(100 * c['mfu'] if c.get('mfu') else None, 1)}%"
                f" (first step {_x(c.get('first_step_s'), 0)} s)"
            )
    return "".join(f"; {p}" for p in parts)


def markdown(r: dict) -> str:
    env = r.get("env", {})
    lines = [
        f"**{env.get('card')}** · driver {env.get('driver')} · torch {env.get('torch')} · transformers "
        f"{env.get('transformers')} · {env.get('date')} · commit {str(env.get('commit'))[:10]} · "
        f"`{r.get('command')}`",
        "",
    ]
    c = r.get("ceilings", {})
    if c:
        lines += [
            f"Ceilings measured in the run: copy {_x((c.get('copy_bandwidth_Bps') or 0) / 1e12)} TB/s "
            f"(read + write), bf16 matmul {_x((c.get('matmul_bf16_flops') or 0) / 1e12, 0)} TFLOP/s.",
            "",
        ]
    dec = r.get("decode", {})
    if dec.get("recipes"):
        lines += [
            f"Decode, greedy, {dec.get('prompt')}-token prompt + {dec.get('new_tokens')} new tokens "
            "(tokens/s; × transformers `generate`; % of the bandwidth floor):",
            "",
            "| recipe | batch | transformers | plain | fast (graph) | fast (graph + compile) | floor |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, rec in dec["recipes"].items():
            for bsz, row in rec.get("batches", {}).items():

                def cell(label, row=row):
                    v = row.get(label, {})
                    if "tokens_per_s" not in v:
                        return "—"
                    s = f"{v['tokens_per_s']:.0f}"
                    if "vs_transformers" in v:
                        s += f" ({v['vs_transformers']:.1f}×"
                        s += f", {100 * v['fraction_of_floor']:.0f}%)" if "fraction_of_floor" in v else ")"
                    elif "fraction_of_floor" in v:
                        s += f" ({100 * v['fraction_of_floor']:.0f}%)"
                    return s

                lines.append(
                    f"| {name} | {bsz} | {cell('transformers')} | {cell('plain')} | {cell('fast_graph')} | "
                    f"{cell('fast_compiled')} | {_x(row.get('floor_tokens_per_s'), 0)} |"
                )
        lines.append("")
    p = r.get("prefill", {})
    if p.get("transformers"):
        lines += [
            f"Prefill, batch {p['batch']} × {p['length']} (tokens/s): transformers "
            f"{p['transformers']['tokens_per_s']:.0f}; identity {_x(dig(p, 'identity', 'tokens_per_s'), 0)} "
            f"({_x(dig(p, 'identity', 'vs_transformers'))}×); two-source "
            f"{_x(dig(p, 'two_source', 'tokens_per_s'), 0)} ({_x(dig(p, 'two_source', 'vs_transformers'))}×).",
            "",
        ]
    s = r.get("routed_slot", {})
    if "routed_over_one_block" in s:
        lines += [
            f"Routed slot (two equal experts, top-1, {100 * s['tokens_to_expert_1']:.0f}% of tokens to the "
            f"second): {s['routed_over_one_block']:.2f}× one block (every expert's MLP on every token: "
            f"{s['dense_over_one_block']:.2f}×)"
            + (
                f"; with the blocks and router compiled: {s['compiled']['routed_over_one_block']:.2f}×"
                if "routed_over_one_block" in s.get("compiled", {})
                else ""
            )
            + ".",
            "",
        ]
    t = r.get("training", {})
    if "tokens_per_s" in t:
        lines += [
            f"Training step (adapters + routers, two-source, batch {t['batch']} × {t['length']}, bf16): "
            f"{t['tokens_per_s']:.0f} tokens/s, {_x((t.get('achieved_flops') or 0) / 1e12, 0)} TFLOP/s, "
            f"MFU {_x(100 * t['mfu'] if t.get('mfu') else None, 1)}% (datasheet peak; "
            f"{_x(100 * t['fraction_of_measured_matmul_rate'] if t.get('fraction_of_measured_matmul_rate') else None, 1)}"
            "% of the measured matmul rate)" + _compiled_training(t) + ".",
            "",
        ]
    bld = r.get("build", {})
    if "mol" in bld and "seconds" in bld["mol"]:
        m, h = bld["mol"], bld.get("transformers", {})
        gib = 2**30
        lines += [
            "Build (a quarter of each source's layers) vs `from_pretrained` of both whole sources:",
            "",
            "| | seconds | read from disk (GiB) | peak RSS (GiB) | peak GPU (GiB) |",
            "|---|---|---|---|---|",
            f"| mol.build | {_x(m['seconds'])} | {_x((m.get('disk_read_bytes') or m['logical_read_bytes']) / gib)} | "
            f"{_x(m['peak_rss_bytes'] / gib)} | {_x((m.get('peak_gpu_bytes') or 0) / gib)} |",
            f"| from_pretrained | {_x(h.get('seconds'))} | "
            f"{_x((h.get('disk_read_bytes') or h.get('logical_read_bytes') or 0) / gib)} | "
            f"{_x((h.get('peak_rss_bytes') or 0) / gib)} | {_x((h.get('peak_gpu_bytes') or 0) / gib)} |",
            "",
            f"Selected tensors {_x(m['selected_bytes'] / gib)} GiB; read / selected {_x(bld.get('read_over_selected'))}; "
            f"peak RSS {_x(m['peak_rss_bytes'] / gib)} GiB against the target 1.25 × selected + 500 MB = "
            f"{_x(bld.get('rss_target_bytes', 0) / gib)} GiB (RSS before the build: "
            f"{_x(m['baseline_rss_bytes'] / gib)} GiB).",
            "",
        ]
    pl = r.get("placement", {})
    for label, v in pl.items():
        if isinstance(v, dict) and "tokens_per_s" in v:
            lines.append(
                f"Placement `{label}` ({', '.join(v['devices'])}): logits rel. diff vs one device "
                f"{v['logits_rel_diff']:.1e}, greedy tokens equal: {v['tokens_vs_one_device']['equal']}, "
                f"decode {v['tokens_per_s']:.1f} tokens/s (batch 1, plain path)."
            )
        elif isinstance(v, dict) and "skipped" in v:
            lines.append(f"Placement `{label}`: not run ({v['skipped']}).")
    if r.get("targets"):
        lines += ["", *targets_markdown(r)]
    return "\n".join(lines).rstrip() + "\n"


def _value(v, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "fraction":
        return f"{100 * v:.1f}%"
    if unit == "s":
        return f"{v:.1f} s"
    return f"{v:.2f}×"


def targets_markdown(r: dict) -> list[str]:
    """The result's targets table (bench/perf/targets.py): one row per target, measured value or the reason."""
    lines = [
        "Targets"
        + (" (smoke sizes on the CPU: the plumbing, not the figures)" if r.get("smoke") else "")
        + ":",
        "",
        "| target | value | goal | met | notes |",
        "|---|---|---|---|---|",
    ]
    for key, e in r["targets"].items():
        unit = e.get("unit", "x")
        notes = []
        if e.get("value") is None:
            notes.append(e.get("reason", ""))
        for k in ("path", "variant", "worst", "shape"):
            if e.get(k):
                notes.append(f"{k} {e[k]}")
        if e.get("cold_s") is not None:
            notes.append(f"cold {e['cold_s']:.1f} s")
        if e.get("top2_of_4") is not None:
            notes.append(f"top-2 of 4: {e['top2_of_4']:.2f}×")
        met = "**yes**" if e.get("met") else "no"
        lines.append(
            f"| `{key}`: {e.get('what', '')} | {_value(e.get('value'), unit)} | {e.get('op', '')} "
            f"{_value(e.get('target'), unit)} | {met} | {'; '.join(notes)} |"
        )
    return lines
