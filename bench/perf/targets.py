"""The targets table of a result: one entry per target of the performance issue, each computed from the figures
the sections measured in the same run (or the runs merged into one file with --add).

Every entry is {"what", "unit", "op", "target", "value", "met"}; a target the run could not measure (no CUDA,
a section skipped or failed, a tool missing) has value None, met False and a "reason". Units: "fraction" (of a
ceiling), "x" (a ratio of two times or rates), "s" (seconds)."""

from __future__ import annotations


def dig(d, *keys):
    """d[k1][k2]..., or None where a key is missing (a section not run, a value not measured)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _entry(
    what: str, unit: str, op: str, target: float, value=None, reason: str | None = None, **extra
) -> dict:
    met = value is not None and (value >= target if op == ">=" else value <= target)
    out = {"what": what, "unit": unit, "op": op, "target": target, "value": value, "met": bool(met)}
    if value is None:
        out["reason"] = reason or "not measured in this run"
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _why(r: dict, section: str, need_cuda: bool = False) -> str:
    if need_cuda and not _cuda(r):
        return "needs a CUDA GPU (this run: " + ("smoke, CPU" if r.get("smoke") else "no CUDA") + ")"
    if section in r.get("errors", {}):
        return f"section {section} failed (see errors)"
    s = r.get(section)
    if s is None:
        return f"section {section} not run"
    if isinstance(s, dict) and "skipped" in s:
        return f"section {section} skipped: {s['skipped']}"
    return f"section {section} has no such figure"


def _cuda(r: dict) -> bool:
    return not r.get("smoke") and (dig(r, "env", "gpus") or 0) > 0


# Fused decode paths, the default one on one CUDA device first (FusedModel.generate takes the graph there).
_PATHS = ("fast_graph", "fast_compiled", "plain")


def _row(r: dict, recipe: str, bsz: int) -> dict:
    return dig(r, "decode", "recipes", recipe, "batches", str(bsz)) or {}


def _fastest(row: dict) -> tuple[str | None, float | None]:
    rates = {p: row[p]["tokens_per_s"] for p in _PATHS if "tokens_per_s" in row.get(p, {})}
    if not rates:
        return None, None
    best = max(rates, key=rates.get)
    return best, rates[best]


def _decode_targets(r: dict) -> dict:
    out = {}
    cuda = _cuda(r)
    for bsz in (1, 8):
        row = _row(r, "identity", bsz)
        v = dig(row, "fast_graph", "fraction_of_floor") if cuda else None
        out[f"decode_default_floor_b{bsz}"] = _entry(
            f"identity recipe, default `generate` path (graph), batch {bsz}: fraction of the copy-bandwidth floor",
            "fraction",
            ">=",
            0.5,
            v,
            _why(r, "decode", need_cuda=True),
        )
    row = _row(r, "identity", 1)
    path, _ = _fastest(row)
    v = dig(row, path, "fraction_of_floor") if cuda and path else None
    out["decode_fastest_floor_b1"] = _entry(
        "identity recipe, fastest fused path, batch 1: fraction of the copy-bandwidth floor",
        "fraction",
        ">=",
        0.7,
        v,
        _why(r, "decode", need_cuda=True),
        path=path if v is not None else None,
    )
    for kind in ("default", "fastest"):
        for bsz in (1, 8):
            row = _row(r, "identity", bsz)
            ref = dig(r, "reference", "batches", str(bsz), "tokens_per_s")
            path = "fast_graph" if kind == "default" else _fastest(row)[0]
            rate = dig(row, path, "tokens_per_s") if path else None
            v = rate / ref if cuda and rate and ref else None
            why = _why(r, "decode" if not rate else "reference", need_cuda=True)
            out[f"decode_{kind}_vs_reference_b{bsz}"] = _entry(
                f"identity recipe, {kind} fused path, batch {bsz}: tokens/s over the gpt-fast-style reference "
                "decoder's (same weights, same run)",
                "x",
                ">=",
                1.3,
                v,
                why,
                path=path if v is not None else None,
            )
    by_batch = {}
    for bsz in (1, 8):
        a = dig(_row(r, "two_source", bsz), "fast_graph", "fraction_of_floor")
        i = dig(_row(r, "identity", bsz), "fast_graph", "fraction_of_floor")
        if a and i:
            by_batch[str(bsz)] = a / i
    v = min(by_batch.values()) if cuda and len(by_batch) == 2 else None
    out["decode_routed_floor_vs_identity"] = _entry(
        "two-source routed recipe's fraction of its own floor over the identity recipe's (default path, the "
        "lower of batch 1 and 8)",
        "x",
        ">=",
        0.8,
        v,
        _why(r, "decode", need_cuda=True),
        by_batch=by_batch if v is not None else None,
    )
    return out


def _first_call(r: dict) -> dict:
    fc = r.get("first_call") or {}
    warm = dig(fc, "warm", "first_call_s") if fc.get("compile") else None
    why = _why(r, "first_call", need_cuda=True)
    if _cuda(r) and not fc.get("compile") and "first_call" in r:
        why = "the compiled fast path was not run (--no-compile)"
    for label in ("cold", "warm"):
        if "error" in fc.get(label, {}):
            why = f"the {label} process failed (see first_call.{label}.error)"
    return {
        "first_call_warm_s": _entry(
            "compiled fast path (FastDecoder(compile=True)), batch 1: first `generate` in a new process with "
            "the compile cache a previous process filled (prompt, compilation from the cache, graph capture)",
            "s",
            "<=",
            10.0,
            warm,
            why,
            cold_s=dig(fc, "cold", "first_call_s") if warm is not None else None,
        )
    }


def _routed(r: dict) -> dict:
    s = r.get("routed_slot") or {}
    shape = f"{s.get('batch')} x {s.get('length')}" if "batch" in s else None
    c = s.get("compiled") or {}
    return {
        "routed_slot_eager": _entry(
            "routed slot (two equal experts, top-1) over one block, forward, eager",
            "x",
            "<=",
            1.3,
            s.get("routed_over_one_block"),
            _why(r, "routed_slot"),
            shape=shape,
            top2_of_4=s.get("top2_of_4_over_one_block"),
        ),
        "routed_slot_compiled": _entry(
            "routed slot (two equal experts, top-1) over one block, forward, both compiled (mol.compiling)",
            "x",
            "<=",
            1.3,
            c.get("routed_over_one_block"),
            _why(r, "routed_slot", need_cuda=True) if s else _why(r, "routed_slot"),
            shape=shape,
            top2_of_4=c.get("top2_of_4_over_one_block"),
        ),
    }


def _training(r: dict) -> dict:
    t = r.get("training") or {}
    variants = {
        k: v
        for k, v in (
            ("eager", t),
            ("compiled", t.get("compiled")),
            ("compiled_network", t.get("compiled_network")),
        )
        if isinstance(v, dict) and v.get("mfu")
    }
    best = max(variants, key=lambda k: variants[k]["mfu"]) if variants else None
    why = _why(r, "training")
    if t and "tokens_per_s" in t and not variants:
        why = f"no datasheet bf16 peak for this device ({dig(r, 'env', 'card')})"
    return {
        "training_mfu": _entry(
            "training step of the two-source recipe (adapters + routers, bf16): model FLOP utilisation of the "
            "datasheet peak, best variant",
            "fraction",
            ">=",
            0.55,
            variants[best]["mfu"] if best else None,
            why,
            variant=best,
            shape=f"{t.get('batch')} x {t.get('length')}" if "batch" in t else None,
        )
    }


def _lanes(r: dict) -> dict:
    s = r.get("lanes") or {}
    by_batch = {k: v["lanes_over_sum"] for k, v in (s.get("decode") or {}).items() if "lanes_over_sum" in v}
    pre = dig(s, "prefill", "lanes_over_sum")
    return {
        "lanes_decode_vs_sum": _entry(
            "two-lane recipe with an output mixture: decode time over the sum of its lanes' sources' own decode "
            "times (default `generate` path; the higher over the batches)",
            "x",
            "<=",
            0.9,
            max(by_batch.values()) if by_batch else None,
            _why(r, "lanes"),
            by_batch=by_batch or None,
        ),
        "lanes_prefill_vs_sum": _entry(
            "two-lane recipe with an output mixture: prefill time over the sum of its lanes' sources' own",
            "x",
            "<=",
            0.9,
            pre,
            _why(r, "lanes"),
            shape=f"{dig(s, 'prefill', 'batch')} x {dig(s, 'prefill', 'length')}" if pre else None,
        ),
    }


def _vs_transformers(r: dict) -> dict:
    where = "cuda" if _cuda(r) else "cpu"
    shapes = {}
    for bsz, row in (dig(r, "decode", "recipes", "identity", "batches") or {}).items():
        for p in _PATHS:
            v = dig(row, p, "vs_transformers")
            if v is not None:
                shapes[f"decode b{bsz} {p} ({where})"] = v
    p = r.get("prefill") or {}
    if dig(p, "identity", "vs_transformers") is not None:
        shapes[f"prefill {p.get('batch')}x{p.get('length')} ({where})"] = p["identity"]["vs_transformers"]
    c = r.get("cpu") or {}
    if dig(c, "decode", "vs_transformers") is not None:
        shapes["decode b1 plain (cpu, 2 threads)"] = c["decode"]["vs_transformers"]
    if dig(c, "prefill", "vs_transformers") is not None:
        shapes[f"prefill 1x{c.get('prefill_length')} (cpu, 2 threads)"] = c["prefill"]["vs_transformers"]
    worst = min(shapes, key=shapes.get) if shapes else None
    return {
        "min_vs_transformers": _entry(
            "identity recipe against transformers on every measured shape and fused path (decode tokens/s, "
            "prefill tokens/s; the CPU included): the lowest ratio",
            "x",
            ">=",
            0.95,
            shapes[worst] if worst else None,
            _why(r, "decode"),
            worst=worst,
            by_shape=shapes or None,
        )
    }


def _export(r: dict) -> dict:
    e = r.get("export") or {}
    why = e.get("skipped") or _why(r, "export")
    out = {}
    for key, what, target in (
        ("export_time_vs_mergekit", "`mol export` wall time over mergekit's, 28-layer frankenmerge", 0.5),
        ("export_rss_vs_mergekit", "`mol export` peak RSS over mergekit's, 28-layer frankenmerge", 0.2),
    ):
        out[key] = _entry(what, "x", "<=", target, e.get(key.removeprefix("export_")), why)
    return out


def targets(r: dict) -> dict:
    """The targets table of result `r` (a dict as the suite writes it)."""
    out = {}
    for part in (_decode_targets, _first_call, _routed, _training, _lanes, _vs_transformers, _export):
        out.update(part(r))
    return out


KEYS = tuple(targets({"env": {}, "smoke": True}))
