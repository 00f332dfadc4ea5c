"""The fast path's first call in a new process: build the identity recipe, then time the first `generate` of a
compiled FastDecoder (prompt, compilation or its cache, CUDA-graph capture) and a second one. Run as

    python -m bench.perf.first_call_probe < CONFIG.json     # prints one JSON line

CONFIG: {"base": folder, "device", "dtype", "batch", "prompt", "new_tokens", "vocab", "cache": folder,
"compile": bool, "tune": bool (default true)}. The cache folder is handed to FastDecoder (mol.compiling.use_compile_cache)."""

from __future__ import annotations

import json
import os
import sys
import time


def probe(cfg: dict) -> dict:
    t0 = time.perf_counter()
    import torch

    import mol
    from mol.fast import FastDecoder

    imported = time.perf_counter() - t0
    dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    layers = cfg["layers"]
    recipe = mol.Recipe.from_dict(
        {"name": "identity", "models": {"base": cfg["base"]}, "slots": [f"base:0-{layers - 1}"]}
    )
    t = time.perf_counter()
    model = mol.build(recipe, device=dev, dtype=dtype, load_tokenizer=False)
    built = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg["vocab"], (cfg["batch"], cfg["prompt"]), generator=g).to(dev)
    new = cfg["new_tokens"]
    dec = FastDecoder(
        model,
        cfg["batch"],
        cfg["prompt"] + new,
        cuda_graph=dev == "cuda",
        compile=cfg["compile"],
        compile_cache=cfg["cache"],
        tune=cfg.get("tune", True),
    )
    sync()
    t = time.perf_counter()
    dec.generate(ids, max_new_tokens=new)
    sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    dec.generate(ids, max_new_tokens=new)
    sync()
    second = time.perf_counter() - t
    try:  # where the compilation's time went (dynamo's own phase timings), for the first call's breakdown
        phases = torch._dynamo.utils.compile_times(repr="str")[:3000]
    except Exception as e:  # a release without it
        phases = f"unavailable: {type(e).__name__}"
    from torch._dynamo.utils import counters

    # cache hits, misses and bypasses, and tuning benchmarks: what a warm start still compiled or tuned anew
    caches = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd") and v}
    return {
        "compile_phases": phases,
        "compile_counters": caches,
        "import_s": imported,
        "build_s": built,
        "first_call_s": first,
        "second_call_s": second,
        "compile": cfg["compile"],
        "tune": cfg.get("tune", True),
        "cache_dir_set": os.environ.get("TORCHINDUCTOR_CACHE_DIR") == os.path.realpath(cfg["cache"]),
    }


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.stdin.read()))))
