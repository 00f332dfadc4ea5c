"""`mol export` against `mergekit-yaml` on one frankenmerge: a random base source in bfloat16 on disk (the
suite's base shape), a passthrough stack of two overlapping runs of its layers (22 -> 28 layers at TinyLlama's
shape: 0-13 then 8-21), written as a standard checkpoint by each tool from the same page-cache state.

Each run is a fresh wrapper process that starts the tool as its only child and reports the wall time and the
child's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`: the whole process, imports included, for both tools).
Runs alternate mol / mergekit, `rounds` times; before each, the last output is deleted and `os.sync()` flushes
what earlier runs left dirty, so that no run pays for another's writeback. The source is read once first (warm
cache). Then the two outputs are compared tensor by tensor (names, dtype, shape and bytes).

mergekit is the `mergekit-yaml` executable named by $MERGEKIT_YAML, else the one on PATH; without it the
section says so and measures nothing. bench/export_memory.py measures mol's own export memory against the
largest shard it writes; this compares the two tools as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

# The wrapper: runs argv[1:] as its only child; prints {"seconds", "peak_rss_bytes", "returncode"}.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
sys.stderr.write(proc.stderr.decode(errors="replace")[-3000:] if proc.returncode else "")
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "returncode": proc.returncode}))
"""
MERGEKIT_OPTIONS = ["--no-copy-tokenizer"]  # the random source has no tokenizer; mol copies none either


def find_mergekit() -> str | None:
    exe = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    return exe if exe and os.access(exe, os.X_OK) else None


def mergekit_version(exe: str) -> str | None:
    """mergekit's version, asked of the Python that runs the executable (its shebang), else its folder's."""
    python = None
    try:
        first = Path(exe).read_bytes()[:300].split(b"\n", 1)[0].decode()
        if first.startswith("#!"):
            python = first[2:].strip().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        pass
    for candidate in (python, str(Path(exe).with_name("python"))):
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run(
                [candidate, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                return out.stdout.strip()
    return None


def frankenmerge_slots(layers: int) -> list[str]:
    """Two overlapping runs of the source's layers, each 14/22 of them: 0-13 then 8-21 for 22 layers (28)."""
    n = max(1, (layers * 14 + 10) // 22)
    return [f"base:0-{n - 1}", f"base:{layers - n}-{layers - 1}"]


def measure(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env, check=False
    )
    row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    if proc.returncode or row.get("returncode"):
        raise RuntimeError(f"{' '.join(cmd[:2])} … failed: {proc.stderr.strip()[-2000:]}")
    return row


def read_file(path: Path, chunk: int = 64 * 2**20) -> None:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        while fh.readinto(buf):
            pass


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _tensors(folder: Path) -> dict[str, tuple[Path, int, dict]]:
    """{name: (file, data start, header entry)} over every shard of a safetensors folder."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        start, header = _header(path)
        for name, entry in header.items():
            out[name] = (path, start, entry)
    return out


def compare(a: Path, b: Path, chunk: int = 64 * 2**20) -> dict:
    """Tensor by tensor: same names, dtype, shape and bytes (read in chunks, never whole tensors)."""
    ta, tb = _tensors(a), _tensors(b)
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    differing, total = [], 0
    for name in sorted(set(ta) & set(tb)):
        (fa, sa, ea), (fb, sb, eb) = ta[name], tb[name]
        if ea["dtype"] != eb["dtype"] or ea["shape"] != eb["shape"]:
            differing.append(name)
            continue
        (a0, a1), (b0, b1) = ea["data_offsets"], eb["data_offsets"]
        if a1 - a0 != b1 - b0:
            differing.append(name)
            continue
        with open(fa, "rb") as ha, open(fb, "rb") as hb:
            ha.seek(sa + a0)
            hb.seek(sb + b0)
            left = a1 - a0
            while left:
                k = min(chunk, left)
                if ha.read(k) != hb.read(k):
                    differing.append(name)
                    break
                left -= k
        total += a1 - a0
    return {
        "identical": not (only_a or only_b or differing),
        "tensors": len(set(ta) & set(tb)),
        "bytes_compared": total,
        "only_in_mol": only_a[:5],
        "only_in_mergekit": only_b[:5],
        "differing": differing[:5],
        "names_mapped": 0,  # both write the same names
    }


def run(work: Path, shape: dict, smoke: bool, rounds: int = 2) -> dict:
    """The section's figures (see the module's docstring)."""
    import torch

    import mol
    from bench.perf.models import make_source
    from mol.export.mergekit import export_mergekit

    exe = find_mergekit()
    if exe is None:
        return {
            "mergekit_installed": False,
            "skipped": "mergekit is not installed here: no `mergekit-yaml` on PATH and $MERGEKIT_YAML unset",
        }
    layers = shape["num_hidden_layers"]
    src = work / "export-source"
    if not (src / "config.json").exists():
        make_source(src, shape, "cpu", seed=0, dtype=torch.bfloat16)
    slots = frankenmerge_slots(layers)
    recipe = mol.Recipe.from_dict({"name": "frankenmerge", "models": {"base": str(src)}, "slots": slots})
    recipe_file, mk_file = work / "frankenmerge.yaml", work / "frankenmerge-mergekit.yml"
    recipe_file.write_text(recipe.to_yaml())
    mk_file.write_text(export_mergekit(recipe, dtype=torch.bfloat16, public=False))  # the source's real path
    mk_text = export_mergekit(recipe, dtype=torch.bfloat16)  # for the record: the folder's name, no path
    outs = {"mol": work / "export-mol", "mergekit": work / "export-mergekit"}
    cmds = {
        "mol": [
            sys.executable,
            "-m",
            "mol.cli",
            "export",
            str(recipe_file),
            str(outs["mol"]),
            "--format",
            "standard",
        ],
        "mergekit": [exe, str(mk_file), str(outs["mergekit"]), *MERGEKIT_OPTIONS],
    }
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    for path in sorted(src.glob("*.safetensors")):
        read_file(path)  # warm: both tools read the source from the page cache
    runs: dict[str, list[dict]] = {"mol": [], "mergekit": []}
    for _ in range(rounds):
        for tool in ("mol", "mergekit"):
            shutil.rmtree(outs[tool], ignore_errors=True)
            os.sync()
            runs[tool].append(measure(cmds[tool], env))
    same = compare(outs["mol"], outs["mergekit"])
    figures = {}
    for tool, rows in runs.items():
        figures[tool] = {
            "seconds": [round(r["seconds"], 3) for r in rows],
            "best_s": min(r["seconds"] for r in rows),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
        }
    figures["mol"]["command"] = "mol export RECIPE OUT --format standard"
    figures["mergekit"]["command"] = "mergekit-yaml CONFIG OUT " + " ".join(MERGEKIT_OPTIONS)
    figures["mergekit"]["version"] = mergekit_version(exe)
    written = sum(p.stat().st_size for p in outs["mol"].glob("*.safetensors"))
    result = {
        "mergekit_installed": True,
        "smoke": smoke,
        "source": {"layers": layers, "dtype": "bfloat16", "hidden_size": shape["hidden_size"]},
        "slots": slots,
        "output_layers": sum(int(s.split("-")[1]) - int(s.split(":")[1].split("-")[0]) + 1 for s in slots),
        "written_bytes": written,
        "mergekit_config": mk_text,
        "rounds": rounds,
        "page_cache": "warm (source read once first); os.sync() and the last output deleted before each run",
        **figures,
        "outputs": same,
        "time_vs_mergekit": figures["mol"]["best_s"] / figures["mergekit"]["best_s"],
        "rss_vs_mergekit": figures["mol"]["peak_rss_bytes"] / figures["mergekit"]["peak_rss_bytes"],
    }
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return result
