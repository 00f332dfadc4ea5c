"""Host overhead of plain decoding: `FusedModel.generate(fast=False)` on the identity recipe vs transformers'
own `generate` (greedy, default dynamic cache) on the same weights, at a width where compute is negligible and
the per-step Python, op dispatch and host syncs are the whole cost (as on a GPU at batch 1-8).

    python -m bench.perf.host_overhead --out host.json                           # CPU proxy (hidden 128)
    python -m bench.perf.host_overhead --device cuda --width 2048 --intermediate 5632 --new 256

Besides tokens/s it counts, per decode step, the ops dispatched (each a kernel launch on a GPU) and the host
syncs (`item`, `tolist`, `bool(tensor)`, `nonzero`, ...: each stalls a GPU pipeline) of both."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mol
from bench.perf import models as M
from bench.perf.common import environment, sync

SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "any", "all"}


class _Syncs(TorchFunctionMode):
    """Counts the tensor methods that copy a value to the host (`any`/`all` only where their result is read)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS - {"any", "all"}:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _runners(hf, fused, ids, new):
    gen = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids), eos_token_id=None)
    return {
        "transformers": lambda n=new: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen),
        "mol_plain": lambda n=new: fused.generate(ids, max_new_tokens=n, eos_token_id=[], fast=False),
    }


def _per_step(fn, new: int) -> dict:
    """Ops and syncs per decode step: the difference between `new` and 2 new tokens, over new - 2 steps."""
    counts = {}
    for n in (2, new):
        with torch.no_grad(), _Syncs() as s, _Ops() as o:
            fn(n)
        counts[n] = (o.n, s.counts)
    steps = new - 2
    syncs = {k: (counts[new][1][k] - counts[2][1][k]) / steps for k in counts[new][1]}
    return {
        "ops_per_step": (counts[new][0] - counts[2][0]) / steps,
        "syncs_per_step": {k: v for k, v in syncs.items() if v},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions of mol's decode")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shape = dict(M.SHAPES["full"]["base"], hidden_size=a.width, intermediate_size=a.intermediate)
    shape.update(num_hidden_layers=a.layers, vocab_size=a.vocab)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32  # as models.make_source makes it
    work = Path(tempfile.mkdtemp(prefix="mol-host-"))
    hf = M.make_source(work / "base", shape, a.device, seed=0, keep=True)
    fused = mol.build(
        M.identity_recipe(work / "base", a.layers), device=a.device, dtype=dtype, load_tokenizer=False
    )
    res = {"env": environment(), "args": {k: str(v) for k, v in vars(a).items()}, "batches": {}}
    print(f"{'batch':>5} {'runner':>13} {'tokens/s':>10} {'ms/step':>8} {'ops/step':>9}  syncs/step")
    for bsz in a.batches:
        g = torch.Generator().manual_seed(bsz)
        ids = torch.randint(3, a.vocab, (bsz, a.prompt), generator=g).to(a.device)
        runs, row, toks = _runners(hf, fused, ids, a.new), {}, {}
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn(8)  # warm-up
        for _ in range(a.repeat):  # interleaved, so that a slower spell of the machine hits both
            for name, fn in runs.items():
                sync()
                t0 = time.perf_counter()
                toks[name] = fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        for name, fn in runs.items():
            best = min(times[name])
            row[name] = {
                "seconds": best,
                "tokens_per_s": bsz * a.new / best,
                "ms_per_step": 1000 * best / a.new,
            }
            row[name].update(_per_step(fn, min(a.new, 16)))
            r = row[name]
            print(
                f"{bsz:>5} {name:>13} {r['tokens_per_s']:>10.1f} {r['ms_per_step']:>8.2f} "
                f"{r['ops_per_step']:>9.1f}  {r['syncs_per_step']}"
            )
        row["ratio"] = row["mol_plain"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        row["tokens_equal"] = bool(torch.equal(toks["mol_plain"], toks["transformers"]))
        print(f"{bsz:>5} {'mol/hf':>13} {row['ratio']:>10.3f}x   tokens equal: {row['tokens_equal']}")
        res["batches"][str(bsz)] = row
        if a.profile:
            prof = cProfile.Profile()
            prof.runcall(runs["mol_plain"])
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
