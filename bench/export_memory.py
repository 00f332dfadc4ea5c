"""Peak host memory of `mol.export` against the largest shard it writes.

Builds a random Llama-shaped checkpoint (about 300 MB in float32) in a temporary folder, then, each in a fresh
process, exports a depth-upscaled stack of it (standard format) and a routed recipe (MoLForCausalLM format)
with 64 MB shards, and, for comparison, the load-everything-then-save approach (build the fused model, save its
state dict). Peak RSS is read from the kernel (VmHWM, reset after imports so that it covers the export only).

    python bench/export_memory.py          # writes bench/export_memory.json and bench/export_memory.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARD = "64MB"
SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def make_source(folder: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="10GB")
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"parameters": params, "bytes": params * 4, "largest_tensor_bytes": largest, "config": SHAPE}


CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, mol
from mol.export import export

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

scenario, source, out, shard = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if scenario == "routed":
    recipe = mol.Recipe.from_dict({"name": "routed", "models": {"m": source},
        "slots": ["m:0-3", {"experts": ["m:4", "m:5"]}, "m:6-11"]})
else:
    recipe = mol.Recipe.from_dict({"name": "upscaled", "models": {"m": source}, "slots": ["m:0-7", "m:4-11"]})
the_plan = mol.plan(recipe)
from mol import layout
layout.shell(the_plan.base)  # import the model classes now: module code is not export memory
baseline = status("VmRSS")
try:  # reset the high-water mark so that it covers what follows only
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
t = time.perf_counter()
if scenario == "load-then-save":
    from safetensors.torch import save_file
    model = mol.build(the_plan, device="cpu", dtype=torch.float32, load_tokenizer=False)
    os.makedirs(out, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    seen, unique = set(), {}
    for k, v in state.items():  # shared tensors (repeated layers) are saved once each name, as copies
        unique[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(unique, os.path.join(out, "model.safetensors"))
    shards = [{"bytes": os.path.getsize(os.path.join(out, "model.safetensors"))}]
    fmt = "single file"
else:
    dtype = "bfloat16" if scenario.endswith("-bf16") else None
    result = export(the_plan, out, max_shard_size=shard, dtype=dtype)
    shards, fmt = result.shards, result.format
seconds = time.perf_counter() - t
print(json.dumps({"scenario": scenario, "format": fmt, "seconds": round(seconds, 2), "baseline_rss": baseline,
                  "peak_rss": status("VmHWM"), "peak_reset_after_imports": reset,
                  "shards": len(shards), "largest_shard_bytes": max(s["bytes"] for s in shards),
                  "written_bytes": sum(s["bytes"] for s in shards)}))
"""


def run_child(scenario: str, source: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), scenario, str(source), str(out), SHARD],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["peak_over_baseline"] = row["peak_rss"] - row["baseline_rss"]
    return row


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = make_source(tmp / "source")
        rows = [
            run_child(s, tmp / "source", tmp / s)
            for s in ("upscaled", "upscaled-bf16", "routed", "load-then-save")
        ]
    result = {
        "what": "peak host memory of an export vs. the largest shard written",
        "source_model": source,
        "shard_limit": SHARD,
        "results": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "system": platform.system(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    (HERE / "export_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Export memory",
        "",
        f"Source: random Llama-shaped checkpoint, {source['parameters'] / 1e6:.0f}M parameters, "
        f"{mib(source['bytes'])} float32 (largest tensor {mib(source['largest_tensor_bytes'])}). "
        f"Shard limit {SHARD}. Peak RSS above the process's RSS after imports (`VmHWM`, reset before the export).",
        "",
        "| scenario | format | written | shards | largest shard | peak RSS over baseline | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['format']} | {mib(r['written_bytes'])} | {r['shards']} | "
            f"{mib(r['largest_shard_bytes'])} | {mib(r['peak_over_baseline'])} | {r['seconds']} |"
        )
    lines += [
        "",
        "`upscaled`: slots m:0-7 + m:4-11 (20 layers, standard Llama); `-bf16`: cast to bfloat16 while copying. `routed`: a token-routed slot between two "
        "layers (MoLForCausalLM). `load-then-save`: build the fused model and save its state dict in one file, "
        "for comparison. The streamed export copies tensors in 32 MiB chunks read by offset into one reused "
        "buffer (no mmap), so its peak is about one chunk (two when casting), whatever the model or shard size. "
        "Regenerate with `python bench/export_memory.py`.",
        "",
    ]
    (HERE / "export_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
