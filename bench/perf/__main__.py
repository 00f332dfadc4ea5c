"""The performance suite: fused inference and training against transformers and the hardware ceilings.

    python -m bench.perf                       # the whole suite on a CUDA machine -> bench/results/<card>-<date>.json
    python -m bench.perf --smoke --out DIR     # tiny CPU version of every section (CI), seconds
    python -m bench.perf --table FILE.json     # a result file as the Markdown table of bench/README.md
    python -m bench.perf --sections S --add    # more sections into today's file, keeping the ones it has

The file's top-level "targets" table (bench/perf/targets.py) holds one entry per target of the performance
issue, each computed from the sections' figures: {"value", "target", "met"}, or value None with a reason.

Models are random-initialised at realistic shapes (bench/perf/models.py: a ~1.1B Llama, TinyLlama's shape,
and a ~0.5B Qwen2-style source of another width), saved to a temporary folder, and built from there. Each
section's figures are written to the JSON file as soon as they exist, so a run stopped by its time budget
(--budget seconds) keeps what it measured; sections that would not fit are marked skipped."""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import mol
from bench.perf import models as M
from bench.perf.common import environment
from bench.perf.sections import SECTIONS, repo_root
from bench.perf.targets import targets

# Seconds a step needs, to decide whether it still fits the budget.
ESTIMATES = {
    "full": {"decode_batch": 45, "compile": 60, "correctness": 40, "placement": 30},
    "smoke": {"decode_batch": 0, "compile": 0, "correctness": 0, "placement": 0},
}


class Bench:
    def __init__(self, smoke: bool, out_dir: Path, budget: float, compile: bool, work: Path | None = None):
        self.smoke = smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.compile = compile
        self.shapes = M.SHAPES["smoke" if smoke else "full"]
        self.vocab = self.shapes["base"]["vocab_size"]
        self.width = self.shapes["base"]["hidden_size"]
        self.prompt, self.new_tokens = (8, 8) if smoke else (32, 256)
        self.batches = (1, 2) if smoke else (1, 8)
        self.prefill_shape = (2, 32) if smoke else (8, 1024)
        self.repeat = 2 if smoke else 5
        self.budget, self.t0 = budget, time.time()
        self.repo = repo_root()
        self.work = Path(work or tempfile.mkdtemp(prefix="mol-bench-"))
        self.base_dir, self.other_dir = self.work / "base", self.work / "other"
        self.env = environment()
        slug = re.sub(r"[^a-z0-9]+", "-", self.env["card"].lower()).strip("-")
        name = "smoke-cpu.json" if smoke else f"{slug}-{self.env['date'][:10]}.json"
        self.out = Path(out_dir) / name
        self.results: dict = {
            "suite": "bench.perf",
            "smoke": smoke,
            "command": _command(),
            "env": self.env,
            "sizes": {
                "base": self.shapes["base"],
                "other": self.shapes["other"],
                "prompt": self.prompt,
                "new_tokens": self.new_tokens,
                "batches": list(self.batches),
                "prefill": list(self.prefill_shape),
                "dtype": str(self.dtype),
            },
            "errors": {},
        }
        self.plain_tokens: dict = {}
        self._models: dict = {}
        self._hf = None

    # ---- models -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        t = time.perf_counter()
        self._hf = M.make_source(self.base_dir, self.shapes["base"], self.device, seed=0, keep=True)
        M.make_source(self.other_dir, self.shapes["other"], self.device, seed=1)
        self.results["sizes"]["base_parameters"] = sum(p.numel() for p in self._hf.parameters())
        self.results["sizes"]["setup_s"] = time.perf_counter() - t

    def recipe(self, name: str) -> mol.Recipe:
        lb, lo = self.shapes["base"]["num_hidden_layers"], self.shapes["other"]["num_hidden_layers"]
        if name == "identity":
            return M.identity_recipe(self.base_dir, lb)
        if name == "two_source":
            return M.two_source_recipe(self.base_dir, self.other_dir, lb, lo)
        if name == "other":
            return M.other_recipe(self.other_dir, lo)
        if name == "lanes":
            return M.lanes_recipe(self.base_dir, self.other_dir)
        return M.quarter_recipe(self.base_dir, self.other_dir, lb, lo)

    def model(self, name: str):
        if name not in self._models:
            model = mol.build(self.recipe(name), device=self.device, dtype=self.dtype, load_tokenizer=False)
            if model.routed_slots:
                M.randomise_routers(model)  # tokens really split between the experts, as trained routers do
            self._models[name] = model
        return self._models[name]

    def hf_model(self):
        return self._hf

    def free(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- budget and output --------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.budget - (time.time() - self.t0)

    def estimate(self, kind: str) -> float:
        return ESTIMATES["smoke" if self.smoke else "full"][kind]

    def partial(self, section: str, data: dict) -> None:
        self.results[section] = data
        self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = time.time() - self.t0
        self.results["targets"] = targets(self.results)
        self.out.write_text(json.dumps(self.results, indent=1, default=_jsonable) + "\n")


def _command() -> str:
    """The command line, with the folders it named left out (they mean nothing on another machine)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            args.append("DIR")
            skip = False
            continue
        skip = a in ("--out", "--work")
        args.append(a.split("=")[0] + "=DIR" if a.startswith(("--out=", "--work=")) else a)
    return " ".join(["python -m bench.perf", *args])


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def run(
    smoke: bool = False,
    out_dir: str | Path | None = None,
    sections: list[str] | None = None,
    budget: float = 540.0,
    compile: bool = True,
    work: str | Path | None = None,
    add: bool = False,
) -> Path:
    b = Bench(smoke, Path(out_dir or repo_root() / "bench" / "results"), budget, compile, work)
    names = sections or list(SECTIONS)
    if add and b.out.exists():
        _keep_earlier(b, json.loads(b.out.read_text()), names)
    try:
        b.prepare()
        for name in names:
            if b.remaining() <= 0:
                b.results[name] = {"skipped": "time budget"}
                continue
            t = time.perf_counter()
            try:
                b.results[name] = SECTIONS[name](b)
            except Exception as exc:  # keep going: one broken section must not lose the others' figures
                b.results["errors"][name] = "".join(traceback.format_exception(exc))[-4000:]
                print(f"[bench] {name} failed: {exc!r}", file=sys.stderr)
            b.results.setdefault("section_seconds", {})[name] = time.perf_counter() - t
            b.free()
            b.write()
            print(f"[bench] {name} done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    finally:
        b.write()
        if work is None:
            shutil.rmtree(b.work, ignore_errors=True)
    return b.out


def _keep_earlier(b: Bench, earlier: dict, names: list[str]) -> None:
    """--add: the sections of an earlier run of the same file that this run does not repeat stay (targets are
    recomputed over both); the earlier runs' commands are listed."""
    for name in SECTIONS:
        if name in earlier and name not in names:
            b.results[name] = earlier[name]
            if name in earlier.get("errors", {}):
                b.results["errors"][name] = earlier["errors"][name]
    runs = earlier.get("runs") or [{"command": earlier.get("command"), "date": _get_date(earlier)}]
    b.results["runs"] = [*runs, {"command": b.results["command"], "date": b.env["date"], "sections": names}]


def _get_date(r: dict) -> str | None:
    return (r.get("env") or {}).get("date")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU version of every section")
    ap.add_argument("--out", help="folder for the JSON result (default bench/results)")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later steps are skipped past it")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode variant")
    ap.add_argument("--work", help="folder for the random source models (default: a temporary one)")
    ap.add_argument(
        "--add",
        action="store_true",
        help="keep the sections of an existing result file of the same name that this run does not repeat",
    )
    ap.add_argument("--table", help="print a result JSON as the Markdown table of bench/README.md, and exit")
    args = ap.parse_args(argv)
    if args.table:
        from bench.perf.table import markdown

        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    sections = args.sections.split(",") if args.sections else None
    out = run(args.smoke, args.out, sections, args.budget, not args.no_compile, args.work, args.add)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
