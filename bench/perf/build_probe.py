"""One build measured in a fresh process (run by the suite's build section):

    python -m bench.perf.build_probe mol|transformers DEVICE DTYPE BASE_DIR OTHER_DIR < recipe.yaml

Prints one JSON line: seconds, bytes read from disk (page cache emptied of the sources' files first), peak
and baseline host RSS (the kernel's VmHWM, reset after imports), peak GPU memory."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _disk_read() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _evict(files: list[Path]) -> bool:
    """Drop the files' pages from the page cache, so that the build reads them from disk."""
    ok = True
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe(mode: str, device: str, dtype: str, base_dir, other_dir, recipe_yaml: str) -> dict:
    import torch

    import mol

    folders = [Path(base_dir), Path(other_dir)]
    files = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    if device == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context belongs to the baseline, not to the build
        torch.cuda.reset_peak_memory_stats()
    # Both sides import their code before the clock starts (mol imports lazily: left to the build, importing
    # transformers and mol's modules would be timed as building).
    from transformers import AutoModelForCausalLM  # noqa: F401

    import mol.loading  # noqa: F401
    import mol.planning  # noqa: F401

    evicted = _evict(files)
    peak_reset = _reset_peak_rss()
    baseline = _status("VmRSS")
    io0 = _disk_read()
    t0 = time.perf_counter()
    out: dict = {"mode": mode}
    if mode == "mol":
        from mol.planning import plan

        the_plan = plan(mol.Recipe.from_yaml(recipe_yaml))
        model = mol.build(the_plan, device=device, dtype=dtype, load_tokenizer=False)
        out["selected_bytes"] = the_plan.bytes_to_read
        out["logical_read_bytes"] = model.bytes_read
        out["slots"] = len(model.slots)
    else:
        from transformers import AutoModelForCausalLM

        torch_dtype = getattr(torch, dtype)
        models = [
            AutoModelForCausalLM.from_pretrained(
                str(d), dtype=torch_dtype, device_map=device if device == "cuda" else None
            )
            for d in folders
        ]
        out["logical_read_bytes"] = sum(f.stat().st_size for f in files)
        out["models"] = len(models)
    if device == "cuda":
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - t0
    io1 = _disk_read()
    out["disk_read_bytes"] = None if io0 is None or io1 is None or not evicted else io1 - io0
    out["peak_rss_bytes"] = _status("VmHWM")
    out["baseline_rss_bytes"] = baseline
    out["peak_rss_reset"] = peak_reset
    out["page_cache_evicted"] = evicted
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return out


if __name__ == "__main__":
    mode, device, dtype, base_dir, other_dir = sys.argv[1:6]
    print(json.dumps(probe(mode, device, dtype, base_dir, other_dir, sys.stdin.read())))
