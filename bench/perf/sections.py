"""The benchmark sections. Each takes the Bench (models, sizes, device, time budget) and returns a dict of
figures; the runner writes them to JSON as they come."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import mol
from bench.perf.common import (
    copy_bandwidth,
    gpu_peak_bytes,
    gpu_peak_reset,
    matmul_rate,
    peak_bf16,
    sync,
    timeit,
)
from bench.perf.models import parameter_bytes, randomise_routers, routed_slot_recipe, top2_of_4_recipe
from mol.compiling import compile_blocks, compile_network
from mol.fast import FastDecoder
from mol.fused import StepContext
from mol.network import kernels
from mol.network.mixing import can_fuse, fused_mix, mix_logits


# ---- ceilings ------------------------------------------------------------------------------------------------
def ceilings(b) -> dict:
    if b.cuda:
        return {
            "copy_bandwidth_Bps": copy_bandwidth(2**31, "cuda"),
            "matmul_bf16_flops": matmul_rate(8192, "cuda"),
            "note": "copy: 2 GiB device-to-device, bytes read + written; matmul: 8192^3 bf16 on random data",
        }
    return {
        "copy_bandwidth_Bps": copy_bandwidth(2**24, "cpu"),
        "matmul_bf16_flops": matmul_rate(256, "cpu"),
        "note": "CPU smoke sizes; not a ceiling",
    }


# ---- decode ----------------------------------------------------------------------------------------------------
def _prompt(b, bsz: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, b.vocab, (bsz, b.prompt), generator=g).to(b.device)


def _agreement(a: torch.Tensor, c: torch.Tensor, prompt: int) -> dict:
    a, c = a[:, prompt:].cpu(), c[:, prompt:].cpu()
    same = a == c
    first = [int((~row).nonzero()[0]) if (~row).any() else None for row in same]
    return {
        "equal": bool(same.all()),
        "token_agreement": float(same.float().mean()),
        "first_divergence": first,
    }


def decode(b, compiled: bool = False) -> dict:
    """Greedy decode tokens/s: transformers generate (eager, default cache) vs the fused model's plain path and
    its fast path (static cache + CUDA graph); with `compiled`, the fast path compiled (torch.compile) too, added
    to the figures already measured. And the bandwidth floor: one read of the weights per step at copy speed."""
    out = b.results.get("decode") if compiled else None
    out = out or {"prompt": b.prompt, "new_tokens": b.new_tokens, "batches": list(b.batches), "recipes": {}}
    bw = b.results.get("ceilings", {}).get("copy_bandwidth_Bps")
    new = b.new_tokens
    for name in ("identity", "two_source"):
        model = b.model(name)
        step_bytes = parameter_bytes(model) - model.embed.weight.numel() * model.embed.weight.element_size()
        rec = out["recipes"].setdefault(name, {"weight_bytes_per_step": step_bytes, "batches": {}})
        for bsz in b.batches:
            row = rec["batches"].setdefault(str(bsz), {})
            if b.remaining() < b.estimate("compile" if compiled else "decode_batch"):
                row["fast_compiled" if compiled else "skipped"] = {"skipped": "time budget"}
                continue
            ids = _prompt(b, bsz)
            if not compiled:
                _plain_and_transformers(b, name, model, ids, row)
            variants = (
                [("fast_compiled", dict(cuda_graph=True, compile=True))]
                if compiled
                else [("fast_graph", dict(cuda_graph=b.cuda, compile=False))]
            )
            for label, opts in variants:
                dec = FastDecoder(model, bsz, b.prompt + new, **opts)
                row[label], toks = _first_then_best(
                    lambda dec=dec, ids=ids: dec.generate(ids, max_new_tokens=new), bsz, new
                )
                if (name, bsz) in b.plain_tokens:  # (a run of decode_compiled alone has no plain tokens)
                    row[label]["tokens_vs_plain"] = _agreement(toks, b.plain_tokens[name, bsz], b.prompt)
                dec = None
            floor = bsz * bw / step_bytes if bw else None  # tokens/s if a step only read the weights once
            row["floor_tokens_per_s"] = floor
            hf_rate = (
                out["recipes"]
                .get("identity", {})
                .get("batches", {})
                .get(str(bsz), {})
                .get("transformers", {})
                .get("tokens_per_s")
            )
            for label in ("plain", "fast_graph", "fast_compiled", "transformers"):
                if "tokens_per_s" in row.get(label, {}):
                    if floor:
                        row[label]["fraction_of_floor"] = row[label]["tokens_per_s"] / floor
                    if hf_rate and label != "transformers":
                        row[label]["vs_transformers"] = row[label]["tokens_per_s"] / hf_rate
            b.partial("decode", out)
    if not compiled:
        out["correctness_fp32"] = decode_correctness_fp32(b)
    return out


def decode_compiled(b) -> dict:
    if not (b.cuda and b.compile):
        return {"skipped": "needs CUDA (and --compile)"}
    decode(b, compiled=True)
    return {"merged_into": "decode"}


def _plain_and_transformers(b, name, model, ids, row) -> None:
    bsz, new = ids.shape[0], b.new_tokens
    if name == "identity":
        hf = b.hf_model()
        gen = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)
        sync()
        t0 = time.perf_counter()
        hf_tokens = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
        sync()
        row["transformers"] = _rate(time.perf_counter() - t0, bsz, new)
    model.generate(ids, max_new_tokens=4, eos_token_id=[], fast=False)
    sync()
    t0 = time.perf_counter()
    plain = model.generate(ids, max_new_tokens=new, eos_token_id=[], fast=False)
    sync()
    row["plain"] = _rate(time.perf_counter() - t0, bsz, new)
    b.plain_tokens[name, bsz] = plain
    if name == "identity":
        row["plain_vs_transformers_tokens"] = _agreement(plain, hf_tokens, b.prompt)


def _first_then_best(run, bsz: int, new: int, repeat: int = 2) -> tuple[dict, torch.Tensor]:
    """A decoder's first call (capture, compilation: `first_call_s`), then its rate at the best of `repeat`
    calls; and the tokens of the last call."""
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        toks = run()
        sync()
        runs.append(time.perf_counter() - t0)
    return {**_rate(min(runs), bsz, new), "first_call_s": first}, toks


def _rate(seconds: float, bsz: int, new: int) -> dict:
    return {"seconds": seconds, "tokens_per_s": bsz * new / seconds, "ms_per_step": 1000 * seconds / new}


def decode_correctness_fp32(b) -> dict:
    """In float32 (no bf16 rounding to flip near-ties) the fast path's greedy tokens equal the plain path's,
    with left padding in the batch and a routed two-source recipe."""
    if b.remaining() < b.estimate("correctness"):
        return {"skipped": "time budget"}
    res = {}
    new = min(64, b.new_tokens)
    for name in ("identity", "two_source"):
        model = mol.build(b.recipe(name), device=b.device, dtype=torch.float32, load_tokenizer=False)
        if name == "two_source":
            randomise_routers(model)
        ids = _prompt(b, 2, seed=1)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], fast=False)
        dec = FastDecoder(model, 2, b.prompt + new, cuda_graph=b.cuda)
        fast = [
            dec.generate(ids, mask, max_new_tokens=new) for _ in range(2)
        ]  # second: graph replay from step 0
        res[name] = {
            "graph_first_call": _agreement(fast[0], plain, b.prompt),
            "graph_replayed": _agreement(fast[1], plain, b.prompt),
            "new_tokens": new,
        }
        del model, dec
        b.free()
    return res


# ---- prefill ---------------------------------------------------------------------------------------------------
def prefill(b) -> dict:
    """Forward tokens/s at batch × length (full logits), transformers' forward vs the fused model's."""
    bsz, length = b.prefill_shape
    ids = torch.randint(3, b.vocab, (bsz, length), generator=torch.Generator().manual_seed(2)).to(b.device)
    out = {"batch": bsz, "length": length}
    with torch.no_grad():
        hf = b.hf_model()
        t = timeit(lambda: hf(ids), repeat=b.repeat, warmup=2)
        out["transformers"] = {**t, "tokens_per_s": bsz * length / t["median_s"]}
        for name in ("identity", "two_source"):
            model = b.model(name)
            t = timeit(lambda m=model: m(ids), repeat=b.repeat, warmup=2)
            out[name] = {**t, "tokens_per_s": bsz * length / t["median_s"]}
            out[name]["vs_transformers"] = out[name]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
            if name == "identity":
                ours, theirs = model(ids[:1]).logits.float(), hf(ids[:1]).logits.float()
                out[name]["logits_max_abs_diff_vs_transformers"] = float((ours - theirs).abs().max())
                out[name]["logits_rel_diff_vs_transformers"] = float((ours - theirs).norm() / theirs.norm())
    return out


# ---- routed slot -----------------------------------------------------------------------------------------------
def routed_slot(b) -> dict:
    """Forward time of a slot of two equal-size experts (top-1 token routing) as a multiple of one block's:
    attention runs for both experts, the MLP only for each expert's own tokens."""
    one_recipe, two_recipe = routed_slot_recipe(b.base_dir)
    one = mol.build(one_recipe, device=b.device, dtype=b.dtype, load_tokenizer=False)
    two = mol.build(two_recipe, device=b.device, dtype=b.dtype, load_tokenizer=False)
    randomise_routers(two)
    four = mol.build(top2_of_4_recipe(b.base_dir), device=b.device, dtype=b.dtype, load_tokenizer=False)
    randomise_routers(four)  # top-2 of 4: reported beside the target's top-1 of 2
    bsz, length = b.prefill_shape
    h = torch.randn(bsz, length, b.width, generator=torch.Generator().manual_seed(3)).to(b.device, b.dtype)
    mask = torch.ones(bsz, length, dtype=torch.long, device=b.device)
    pos = torch.arange(length, device=b.device).expand(bsz, length)

    def run(model, static=False):
        ctx = StepContext(None, mask, pos, None, {}, model.rotary, static=static)
        return model.slots[0](h, ctx), ctx

    out = {"batch": bsz, "length": length}
    with torch.no_grad():
        t_one = timeit(lambda: run(one), repeat=b.repeat, warmup=2)["median_s"]
        t_two = timeit(lambda: run(two), repeat=b.repeat, warmup=2)["median_s"]
        t_dense = timeit(lambda: run(two, static=True), repeat=b.repeat, warmup=2)["median_s"]
        t_four = timeit(lambda: run(four), repeat=b.repeat, warmup=2)["median_s"]
        _, ctx = run(two)
        share = ctx.routings[0][1].chosen[..., 0].float().mean().item()  # fraction routed to expert 1
        y_sub, _ = run(two)
        y_dense, _ = run(two, static=True)
        flops = {
            k: _count_flops(lambda m=m, st=st: run(m, st))
            for k, (m, st) in {
                "one_block": (one, False),
                "routed_slot": (two, False),
                "routed_slot_dense": (two, True),
            }.items()
        }
    out["flops"] = flops
    if flops["one_block"]:
        out["routed_over_one_block_flops"] = flops["routed_slot"] / flops["one_block"]
        out["dense_over_one_block_flops"] = flops["routed_slot_dense"] / flops["one_block"]
    out.update(
        {
            "one_block_s": t_one,
            "routed_slot_s": t_two,
            "routed_slot_dense_s": t_dense,
            "routed_over_one_block": t_two / t_one,
            "dense_over_one_block": t_dense / t_one,
            "top2_of_4_s": t_four,
            "top2_of_4_over_one_block": t_four / t_one,
            "tokens_to_expert_1": share,
            "subset_vs_dense_max_abs_diff": float((y_sub - y_dense).abs().max()),
        }
    )
    if b.cuda:
        with torch.no_grad():
            out["profiles"] = {
                "one_block": profile_top(lambda: run(one)),
                "routed_slot": profile_top(lambda: run(two)),
            }
    if b.cuda and b.compile:  # both sides compiled block by block (mol.compiling), as training runs them
        compile_blocks(one, routers=True)
        compile_blocks(two, routers=True)
        compile_blocks(four, routers=True)
        with torch.no_grad():
            t_one_c = timeit(lambda: run(one), repeat=b.repeat, warmup=3)["median_s"]
            t_two_c = timeit(lambda: run(two), repeat=b.repeat, warmup=3)["median_s"]
            t_four_c = timeit(lambda: run(four), repeat=b.repeat, warmup=3)["median_s"]
            y_c, _ = run(two)
            profiles = {
                "one_block": profile_top(lambda: run(one)),
                "routed_slot": profile_top(lambda: run(two)),
            }
        out["compiled"] = {
            "one_block_s": t_one_c,
            "routed_slot_s": t_two_c,
            "routed_over_one_block": t_two_c / t_one_c,
            "top2_of_4_s": t_four_c,
            "top2_of_4_over_one_block": t_four_c / t_one_c,
            "vs_eager_max_abs_diff": float((y_c.float() - y_sub.float()).abs().max()),
            "profiles": profiles,
        }
    return out


def profile_top(fn, rows: int = 12) -> dict:
    """Where one call's time goes (torch.profiler): wall time, the time the device was busy running kernels (well
    under the wall time: the host, not the device, sets the pace), and the operators with the most device time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "wall_ms": 1000 * wall,
        "kernels": len(kernels),
        "device_busy_ms": sum(e.device_time_total for e in kernels) / 1000,
        "top": [
            {"op": e.key[:80], "calls": e.count, "self_device_ms": e.self_device_time_total / 1000}
            for e in events[:rows]
        ],
    }


def _count_flops(fn) -> int | None:
    """Matrix-product FLOPs of one call, as torch's FlopCounterMode counts them (None if it cannot)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    except Exception:
        return None
    return counter.get_total_flops()


# ---- training --------------------------------------------------------------------------------------------------
def training(b) -> dict:
    """Adapter + router training step of the two-source recipe (bf16 autocast, AdamW): tokens/s and model FLOP
    utilisation, FLOPs counted by torch's FlopCounterMode on a real eager step (frozen weights: no weight
    gradients). Eager, then, where CUDA allows, compiled block by block and as a whole step (`mol train
    --compile`)."""
    out = _training(b, "eager")
    if b.cuda and b.compile:
        out["compiled"] = _training(b, "blocks", flops=out["flops_per_step"])
        out["compiled_network"] = _training(
            b, "network", flops=out["flops_per_step"]
        )  # as `mol train --compile`
        variants = {"eager": out, "compiled": out["compiled"], "compiled_network": out["compiled_network"]}
        name = max(variants, key=lambda k: variants[k]["tokens_per_s"])
        out["best"] = {
            "variant": name,
            **{k: variants[name].get(k) for k in ("tokens_per_s", "mfu", "fraction_of_measured_matmul_rate")},
        }
    return out


def _training(b, mode: str, flops: int | None = None) -> dict:
    """One variant: "eager", "blocks" (each source block compiled) or "network" (the whole step compiled)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = mol.build(b.recipe("two_source"), device=b.device, dtype=b.dtype, load_tokenizer=False)
    randomise_routers(model, std=0.02)
    params = [p for p in model.trainable_parameters().values() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable parts in fp32; the frozen blocks stay bf16
    model.train()
    aux_weight = mol.TrainConfig().aux_loss_weight  # mol.train's default
    opt = torch.optim.AdamW(params, lr=1e-4, fused=b.cuda)
    bsz, length = b.prefill_shape
    ids = torch.randint(3, b.vocab, (bsz, length), generator=torch.Generator().manual_seed(4)).to(b.device)

    def step():
        with torch.autocast(b.device, dtype=torch.bfloat16, enabled=b.cuda):
            o = model(ids, labels=ids, trace=False)  # as mol.train runs it: no host copy of the routing
            loss = o.loss + aux_weight * o.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    compiled = mode != "eager"
    if mode == "network":
        compile_network(model)
    elif mode == "blocks":
        compile_blocks(model)
    if compiled:
        t_compile = time.perf_counter()
        step()
        sync()
        t_compile = time.perf_counter() - t_compile
    gpu_peak_reset()
    t = timeit(step, repeat=b.repeat, warmup=3 if compiled else 2)
    peak_mem = gpu_peak_bytes()
    profile = profile_top(step) if b.cuda else None
    if flops is None:
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                step()
            flops = counter.get_total_flops()
        except Exception:  # an operator the counter cannot see through: fall back to the count by hand
            flops = None
    if not flops:
        flops = _training_flops_by_hand(model, bsz, length)
    tokens = bsz * length
    n_params = sum(p.numel() for p in model.parameters())
    out = {
        "batch": bsz,
        "length": length,
        **t,
        "tokens_per_s": tokens / t["median_s"],
        "flops_per_step": flops,
        "achieved_flops": flops / t["median_s"],
        "trainable_parameters": sum(p.numel() for p in params),
        "parameters": n_params,
        "peak_gpu_bytes": peak_mem,
    }
    peak = peak_bf16(b.env.get("card", ""))
    if peak:
        out["mfu"] = out["achieved_flops"] / peak
        out["peak_flops_datasheet"] = peak
    measured = b.results.get("ceilings", {}).get("matmul_bf16_flops")
    if measured:
        out["fraction_of_measured_matmul_rate"] = out["achieved_flops"] / measured
    # For reference, the usual 6·N·tokens convention (as if every weight trained) overstates the work done here.
    out["mfu_6n_convention"] = 6 * n_params * tokens / t["median_s"] / peak if peak else None
    if compiled:
        out["first_step_s"] = t_compile  # compilation included
    if profile:
        out["profile"] = profile
    return out


def _training_flops_by_hand(model, bsz: int, length: int) -> int:
    """Matrix-product FLOPs of one step when the counter fails: forward 2·N·T, backward 2·N·T (input gradients
    only: the blocks are frozen), attention 4·T·S·d forward and twice that backward (causal: half)."""
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2) - model.embed.weight.numel()
    tokens = bsz * length
    attn = sum(
        4 * tokens * length * b.layer.self_attn.config.hidden_size // 2
        for s in model.slots
        for b in s.experts
        if hasattr(b.layer, "self_attn")
    )
    return 4 * n * tokens + 3 * attn


# ---- build -----------------------------------------------------------------------------------------------------
def build(b) -> dict:
    """Build a recipe using a quarter of each source's layers vs from_pretrained of every whole source: wall time,
    bytes read from disk (cold page cache), peak host RSS and peak GPU memory, each in a fresh process."""
    out = {}
    recipe_yaml = b.recipe("quarter").to_yaml()
    for mode in ("mol", "transformers"):
        args = [
            sys.executable,
            "-m",
            "bench.perf.build_probe",
            mode,
            b.device,
            str(b.dtype).split(".")[-1],
            str(b.base_dir),
            str(b.other_dir),
        ]
        if b.smoke:
            from bench.perf.build_probe import probe

            out[mode] = probe(
                mode, b.device, str(b.dtype).split(".")[-1], b.base_dir, b.other_dir, recipe_yaml
            )
            continue
        env = dict(os.environ, PYTHONPATH=str(b.repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        res = subprocess.run(
            args, input=recipe_yaml, capture_output=True, text=True, cwd=str(b.repo), env=env, timeout=600
        )
        if res.returncode != 0:
            out[mode] = {"error": res.stderr[-2000:]}
            continue
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    m = out.get("mol", {})
    if "selected_bytes" in m:
        sel = m["selected_bytes"]
        out["read_over_selected"] = (m.get("disk_read_bytes") or m["logical_read_bytes"]) / sel
        out["rss_over_selected"] = m["peak_rss_bytes"] / sel
        out["rss_target_bytes"] = 1.25 * sel + 500e6
        out["rss_added_over_selected"] = (m["peak_rss_bytes"] - m["baseline_rss_bytes"]) / sel
        t = out.get("transformers", {})
        if "seconds" in t:
            out["time_vs_transformers"] = m["seconds"] / t["seconds"]
            out["bytes_vs_transformers"] = m["logical_read_bytes"] / t["logical_read_bytes"]
    return out


# ---- several devices -------------------------------------------------------------------------------------------
def placement(b) -> dict:
    """A recipe over two GPUs (device map) and one with half its slots offloaded to host memory: logits against
    one device (bf16 tolerance) and plain-path decode speed."""
    out = {}
    ids = _prompt(b, 1, seed=5)
    one = b.model("identity")
    with torch.no_grad():
        ref = one(ids).logits.float()
    ref_tokens = one.generate(ids, max_new_tokens=16, eos_token_id=[], fast=False)
    layers = len(one.slots)
    maps = {}
    if torch.cuda.device_count() >= 2:
        maps["two_gpus"] = ("auto", 64)
    if b.cuda:
        maps["cpu_offload_half"] = ({f"slots.{layers // 2}-{layers - 1}": "cpu"}, 8)
    else:
        maps["cpu_map"] = ({"main": "cpu", f"slots.{layers // 2}-{layers - 1}": "cpu"}, 8)
    for label, (device_map, new) in maps.items():
        if b.remaining() < b.estimate("placement"):
            out[label] = {"skipped": "time budget"}
            continue
        model = mol.build(b.recipe("identity"), device_map=device_map, dtype=b.dtype, load_tokenizer=False)
        with torch.no_grad():
            logits = model(ids).logits.float()
        diff = (logits - ref).abs().max().item()
        rel = ((logits - ref).norm() / ref.norm()).item()
        model.generate(ids, max_new_tokens=2, eos_token_id=[])
        sync()
        t0 = time.perf_counter()
        toks = model.generate(ids, max_new_tokens=new, eos_token_id=[])
        sync()
        secs = time.perf_counter() - t0
        devices = sorted({str(s.device or model.device) for s in model.slots})
        out[label] = {
            "device_map": model.placement.device_map(),
            "devices": devices,
            "logits_max_abs_diff": diff,
            "logits_rel_diff": rel,
            "logits_match_bf16": rel < 2e-2,
            "tokens_per_s": new / secs,
            "new_tokens": new,
            "tokens_vs_one_device": _agreement(
                toks[:, : ref_tokens.shape[1]], ref_tokens[:, : toks.shape[1]], b.prompt
            ),
        }
        del model
        b.free()
    if "two_gpus" not in out:
        out["two_gpus"] = {"skipped": f"{torch.cuda.device_count()} CUDA device(s) visible"}
    return out


# ---- the peer baseline ---------------------------------------------------------------------------------------
def reference(b) -> dict:
    """Greedy decode of the identity recipe's source by the gpt-fast-style reference decoder (bench/perf/
    reference.py: the transformers model's own weights, static KV buffers, the one-token step compiled with
    `mode="reduce-overhead"` where CUDA allows), at the decode section's prompt, length and batches."""
    from bench.perf.reference import ReferenceDecoder

    compiled = b.cuda and b.compile
    out = {"compiled": compiled, "batches": {}}
    for bsz in b.batches:
        if b.remaining() < b.estimate("compile" if compiled else "decode_batch"):
            out["batches"][str(bsz)] = {"skipped": "time budget"}
            continue
        ids = _prompt(b, bsz)
        dec = ReferenceDecoder(b.hf_model(), bsz, b.prompt + b.new_tokens)
        if compiled:
            dec.compile_step()
        row, toks = _first_then_best(
            lambda dec=dec, ids=ids: dec.generate(ids, b.new_tokens), bsz, b.new_tokens
        )
        if ("identity", bsz) in b.plain_tokens:
            row["tokens_vs_plain"] = _agreement(toks, b.plain_tokens["identity", bsz], b.prompt)
        out["batches"][str(bsz)] = row
        del dec
        b.free()
    return out


# ---- lanes -----------------------------------------------------------------------------------------------------
def lanes(b) -> dict:
    """A two-lane recipe (each source whole on its own stream, a per-token output mixture) against each lane's
    source alone: decode on the default path (`generate`: on one CUDA device the fast decoder, its lanes side by
    side on two streams of one captured graph) and on the plain path, and prefill (a no-grad forward, the lanes
    on their streams), the lanes' time over the sum of the sources'. At the sum the lanes run one after the
    other; below it, they overlap on the device."""
    new = min(64, b.new_tokens)
    models = {k: b.model(k) for k in ("lanes", "identity", "other")}
    out = {"new_tokens": new, "prompt": b.prompt, "decode": {}}
    paths = {"default": None, "plain": False}
    for bsz in b.batches[:1] if b.smoke else b.batches:  # smoke: one batch size checks the plumbing
        ids = _prompt(b, bsz, seed=6)
        row = {}
        for path, fast in paths.items():
            cell = row[path] = {}
            for name, model in models.items():
                model.generate(ids, max_new_tokens=4 if fast is False else new, eos_token_id=[], fast=fast)
                t = timeit(  # (the fast path's first call above captured its graph)
                    lambda m=model, ids=ids, fast=fast: m.generate(
                        ids, max_new_tokens=new, eos_token_id=[], fast=fast
                    ),
                    repeat=1 if b.smoke or fast is False else 3,
                    warmup=0,
                )
                cell[name] = {**t, "ms_per_step": 1000 * t["median_s"] / new}
            cell["lanes_over_sum"] = cell["lanes"]["median_s"] / (
                cell["identity"]["median_s"] + cell["other"]["median_s"]
            )
        row["lanes_over_sum"] = row["default"]["lanes_over_sum"]
        out["decode"][str(bsz)] = row
        b.partial("lanes", out)
    bsz, length = b.prefill_shape
    ids = torch.randint(3, b.vocab, (bsz, length), generator=torch.Generator().manual_seed(7)).to(b.device)
    pre = {"batch": bsz, "length": length}
    with torch.no_grad():
        for name, model in models.items():
            pre[name] = timeit(lambda m=model: m(ids), repeat=b.repeat, warmup=2)
    pre["lanes_over_sum"] = pre["lanes"]["median_s"] / (
        pre["identity"]["median_s"] + pre["other"]["median_s"]
    )
    out["prefill"] = pre
    out["mixture"] = _mixture_kernel(b, models["lanes"], bsz, length)
    for k in ("lanes", "other"):
        b._models.pop(k, None)
    return out


def _mixture_kernel(b, model, bsz: int, length: int) -> dict:
    """The lanes' output mixture alone over a prefill's logits ([bsz, length, vocabulary] per lane, the model's
    dtype): torch's operations (`mix_logits`: each lane's float32 log-softmax, then `mix`) against the Triton kernel
    (mol.network.mixing.fused_mix), device-synchronised wall time, and their largest difference."""
    with torch.no_grad():
        if not kernels.runs_on(torch.device(b.device)):
            return {"skipped": "needs CUDA and Triton"}
        g = torch.Generator(device=b.device).manual_seed(8)
        logits = [
            torch.randn(bsz, length, b.vocab, generator=g, device=b.device).mul_(3).to(model.dtype)
            for _ in model.lanes
        ]
        scores = torch.randn(bsz, length, len(logits), generator=g, device=b.device)
        assert can_fuse(logits)
        row = {"shape": [bsz, length, b.vocab], "lanes": len(logits)}
        row["torch"] = timeit(lambda: mix_logits(logits, scores), repeat=b.repeat, warmup=2)
        row["kernel"] = timeit(lambda: fused_mix(logits, scores), repeat=b.repeat, warmup=2)
        row["max_abs_difference"] = (
            (fused_mix(logits, scores) - mix_logits(logits, scores)).abs().max().item()
        )
    row["speedup"] = row["torch"]["median_s"] / row["kernel"]["median_s"]
    return row


# ---- where a decode step's time goes ---------------------------------------------------------------------------
def decode_profile(b) -> dict:
    """One decode step of the fast path (identity recipe, each batch size): its time replayed as a CUDA graph, and
    a profile of the same step run eagerly on the same buffers (kernels, their device time, the costliest
    operators). Device time under the replayed step's time is what the launches between kernels cost. And the
    same step's replayed time with the layers as their families wrote them (no `fuse_kernels`), built anew: what
    the fused projections and norms save; and the two-source routed recipe's step, replayed and profiled, for
    where its routed slots' time goes."""
    if not b.cuda:
        return {"skipped": "needs CUDA"}

    def replayed_ms(dec) -> float:
        return 1000 * timeit(lambda: dec._step(True), repeat=50, warmup=5)["median_s"]

    model = b.model("identity")
    unfused = mol.build(
        b.recipe("identity"), device=b.device, dtype=b.dtype, load_tokenizer=False, fuse_kernels=False
    )
    out = {}
    for bsz in b.batches:
        ids = _prompt(b, bsz)
        row, tokens = {}, {}
        for label, net in (("unfused", unfused), ("fused", model)):
            dec = FastDecoder(net, bsz, b.prompt + b.new_tokens)
            tokens[label] = dec.generate(ids, max_new_tokens=8)  # allocates, warms up and captures
            with torch.no_grad():
                row[label] = replayed_ms(dec)
                if label == "fused":
                    row["eager_step"] = profile_top(lambda dec=dec: dec._greedy_step(), rows=16)
            del dec
        out[str(bsz)] = {
            "replayed_step_ms": row["fused"],
            "replayed_step_ms_unfused": row["unfused"],
            "fusion_speedup": row["unfused"] / row["fused"],
            "fused_vs_unfused_tokens": _agreement(tokens["fused"], tokens["unfused"], b.prompt),
            "eager_step": row["eager_step"],
        }
        b.free()
    del unfused
    b.free()
    routed, out["two_source"] = b.model("two_source"), {}
    for bsz in b.batches:
        dec = FastDecoder(routed, bsz, b.prompt + b.new_tokens)
        dec.generate(_prompt(b, bsz), max_new_tokens=8)
        with torch.no_grad():
            out["two_source"][str(bsz)] = {
                "replayed_step_ms": replayed_ms(dec),
                "eager_step": profile_top(lambda dec=dec: dec._greedy_step(), rows=24),
            }
        del dec
        b.free()
    out["attention"] = _decode_attention_kernel(b)
    return out


def _decode_attention_kernel(b) -> dict:
    """A decode step's attention alone, in the identity model's shape over the fast decoder's static cache (keys
    up to `at` written, the rest masked): torch's SDPA on the stacked query rows (what mol.network.attention runs
    without the kernels) against mol.network.decode_attention, each call's time in a replayed CUDA graph of 50."""
    if not kernels.available(torch.device(b.device)):
        return {"skipped": "needs CUDA and Triton"}
    from mol.network.decode_attention import decode_attention

    attn = next(m for m in b.model("identity").modules() if hasattr(m, "num_key_value_groups"))
    groups, d = attn.num_key_value_groups, attn.head_dim
    kv_heads = attn.config.num_key_value_heads
    capacity = -(-(b.prompt + b.new_tokens) // 128) * 128
    g = torch.Generator(device=b.device).manual_seed(9)
    out = {
        "kv_heads": kv_heads,
        "queries_per_kv_head": groups,
        "head_dim": d,
        "capacity": capacity,
        "cases": [],
    }
    for bsz in b.batches:
        rows = torch.randn(bsz, kv_heads, groups, d, generator=g, device=b.device).to(b.dtype)
        keys, values = (
            torch.randn(bsz, kv_heads, capacity, d, generator=g, device=b.device).to(b.dtype)
            for _ in range(2)
        )
        for at in (b.prompt, b.prompt + b.new_tokens // 2, b.prompt + b.new_tokens):
            mask = torch.zeros(bsz, 1, 1, capacity, dtype=b.dtype, device=b.device)
            mask[..., at:] = torch.finfo(b.dtype).min
            wide = mask.expand(bsz, 1, groups, capacity)
            sdpa = partial(
                torch.nn.functional.scaled_dot_product_attention,
                rows,
                keys,
                values,
                attn_mask=wide,
                scale=d**-0.5,
            )
            kernel = partial(decode_attention, rows, keys, values, mask, d**-0.5)
            with torch.no_grad():
                gap = (kernel().float() - sdpa().float()).abs().max().item()
                sdpa_us, kernel_us = _replayed_us(sdpa), _replayed_us(kernel)
            out["cases"].append(
                {
                    "batch": bsz,
                    "keys_written": at,
                    "sdpa_us": sdpa_us,
                    "kernel_us": kernel_us,
                    "speedup": sdpa_us / kernel_us,
                    "max_abs_difference": gap,
                }
            )
    return out


def _replayed_us(fn, calls: int = 50, replays: int = 20) -> float:
    """Microseconds a call of `fn` takes with `calls` of them captured in one CUDA graph (no launch costs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # (compilation, library handles: outside the capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * calls)


# ---- the CPU ---------------------------------------------------------------------------------------------------
def cpu(b) -> dict:
    """The plain path against transformers on the CPU with 2 threads (the studio's Space has 2 vCPUs), float32:
    batch-1 greedy decode and a batch-1 prefill of the identity recipe, on whatever machine runs the suite."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    prompt, new, length = (8, 8, 16) if b.smoke else (32, 16, 64)
    out = {"threads": 2, "dtype": "float32", "prompt": prompt, "new_tokens": new, "prefill_length": length}
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(b.base_dir), dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        model = mol.build(b.recipe("identity"), device="cpu", dtype=torch.float32, load_tokenizer=False)
        g = torch.Generator().manual_seed(8)
        ids = torch.randint(3, b.vocab, (1, prompt), generator=g)
        gen = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)
        t0 = time.perf_counter()
        hf_tokens = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
        hf_s = time.perf_counter() - t0
        model.generate(ids, max_new_tokens=2, eos_token_id=[])
        t0 = time.perf_counter()
        tokens = model.generate(ids, max_new_tokens=new, eos_token_id=[])  # the default path on the CPU
        mol_s = time.perf_counter() - t0
        out["decode"] = {
            "transformers": _rate(hf_s, 1, new),
            "plain": _rate(mol_s, 1, new),
            "vs_transformers": hf_s / mol_s,
            "tokens_vs_transformers": _agreement(tokens, hf_tokens, prompt),
        }
        ids = torch.randint(3, b.vocab, (1, length), generator=g)
        with torch.no_grad():
            t_hf = timeit(lambda: hf(ids), repeat=3, warmup=1)
            t_mol = timeit(lambda: model(ids), repeat=3, warmup=1)
        out["prefill"] = {
            "transformers": t_hf,
            "identity": t_mol,
            "vs_transformers": t_hf["median_s"] / t_mol["median_s"],
        }
    finally:
        torch.set_num_threads(threads)
    return out


# ---- first call ------------------------------------------------------------------------------------------------
def first_call(b) -> dict:
    """The compiled fast path's first `generate` in a new process (bench/perf/first_call_probe.py), twice with
    one compile-cache folder: cold (empty) and warm (the folder the first process filled), batch 1."""
    import tempfile

    from bench.perf.first_call_probe import probe

    cfg = {
        "base": str(b.base_dir),
        "device": b.device,
        "dtype": str(b.dtype).split(".")[-1],
        "layers": b.shapes["base"]["num_hidden_layers"],
        "vocab": b.vocab,
        "batch": 1,
        "prompt": b.prompt,
        "new_tokens": b.new_tokens,
        "compile": b.cuda and b.compile,
    }
    if b.smoke:  # in this process, uncompiled: the probe's plumbing, not its figure
        cfg["cache"] = str(b.work / "compile-cache")
        return {"in_process": probe(cfg), "skipped": "smoke run: the compiled fast path needs CUDA"}
    out = {"compile": cfg["compile"]}
    with tempfile.TemporaryDirectory(prefix="mol-compile-cache-") as cache:
        cfg["cache"] = cache
        env = dict(os.environ, PYTHONPATH=str(b.repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-m", "bench.perf.first_call_probe"],
                input=json.dumps(cfg),
                capture_output=True,
                text=True,
                cwd=str(b.repo),
                env=env,
                timeout=600,
            )
            if res.returncode != 0:
                out[label] = {"error": res.stderr[-2000:]}
                break
            out[label] = json.loads(res.stdout.strip().splitlines()[-1])
            out[label]["process_s"] = time.perf_counter() - t0
            b.partial("first_call", out)
        out["cache_bytes"] = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    return out


# ---- export ----------------------------------------------------------------------------------------------------
def export(b) -> dict:
    """`mol export` (standard checkpoint) against `mergekit-yaml` on a 28-layer passthrough frankenmerge of the
    base shape (0-13 then 8-21 of 22 layers, bfloat16 on disk): wall time and whole-process peak RSS of each, in
    fresh processes, alternating, best of three, warm page cache; the two outputs compared tensor by tensor
    (bench/perf/export_bench.py). mergekit: $MERGEKIT_YAML, else `mergekit-yaml` on PATH, else skipped. Smoke:
    the tiny base shape, one round. bench/export_memory.py measures mol's export memory against its shards."""
    from bench.perf.export_bench import run

    return run(b.work, b.shapes["base"], b.smoke, rounds=1 if b.smoke else 3)


SECTIONS = {
    "ceilings": ceilings,
    "prefill": prefill,
    "decode": decode,
    "reference": reference,
    "routed_slot": routed_slot,
    "training": training,
    "lanes": lanes,
    "decode_profile": decode_profile,
    "cpu": cpu,
    "build": build,
    "placement": placement,
    "export": export,
    "decode_compiled": decode_compiled,
    "first_call": first_call,
}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
