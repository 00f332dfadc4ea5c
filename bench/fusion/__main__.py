"""Fusion bench: does a fusion of the demo models beat its parts? Both pairings, every row, one command:

    python -m bench.fusion                    # train and evaluate everything (a GPU if present, else the CPU)
    python -m bench.fusion --reuse            # evaluate the shipped weights again (no training)
    python -m bench.fusion --smoke --out D    # the same pipeline on a few hundred tokens (checks the pipeline only)

Pairings: the cross-family trio (mango-bard: prose, Llama; mango-coder: code, GPT-NeoX; mango-base: both, GPT-2)
and the same-seed branches (mango-base-prose and mango-base-code, both continued from mango-base). Rows per
pairing: each source alone; single-stream routing (a routed stack ending in one head); lanes with an output
mixture (closed form only, trained; per token and per sequence); lanes with stitches; the gate routed by the true
domain label; and the bound of a gate that always picks the lane best on the very next token.

Test sets: the demo corpora' test split (prose, code, mixed) and text none of the demo models saw
(assets/corpora/unseen). The shipped fusion of each pairing is the trained lanes row with the lowest loss on the
validation split (never the test split); it is written to assets/weights/ beside its recipe in assets/recipes/.
Writes bench/fusion/results.json and the tables in bench/fusion/README.md (between the RESULTS markers)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mol  # noqa: E402
from mol.data import load_domains, tokenize_domains, windows  # noqa: E402
from mol.evaluation import evaluate, source_recipe  # noqa: E402
from mol.planning import plan  # noqa: E402
from mol.training import TrainConfig, companion_paths, hardware, initialise, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CORPORA = ROOT / "assets" / "corpora"
RECIPES = ROOT / "assets" / "recipes"
WEIGHTS = ROOT / "assets" / "weights"
TRAIN = {"prose": [CORPORA / "prose" / "train.txt"], "code": [CORPORA / "code" / "train.txt"]}
VALID = {"prose": [CORPORA / "prose" / "valid.txt"], "code": [CORPORA / "code" / "valid.txt"]}
TEST = {
    "prose": [CORPORA / "prose" / "test.txt"],
    "code": [CORPORA / "code" / "test.txt"],
    "mixed": [CORPORA / "mixed_test.txt"],
    "unseen prose": [CORPORA / "unseen" / "prose.txt"],
    "unseen code": [CORPORA / "unseen" / "code.txt"],
    "unseen mixed": [CORPORA / "unseen" / "mixed.txt"],
}
SEQ_LEN = 512  # evaluation windows, as in bench/demo_family.md
LABEL_OF = {"prose": "prose", "code": "code", "unseen prose": "prose", "unseen code": "code"}


@dataclass(frozen=True)
class Pairing:
    name: str
    what: str
    single: str  # the single-stream routed recipe (one head)
    lanes: str  # lanes + output mixture, no stitches
    stitched: str  # the same lanes joined by stitches


PAIRINGS = {
    "trio": Pairing(
        "trio",
        "cross-family trio: mango-bard (prose, Llama, width 256), mango-coder (code, GPT-NeoX, 192), "
        "mango-base (generalist, GPT-2, 160)",
        "fused-token",
        "lanes-trio",
        "lanes-trio-stitched",
    ),
    "branches": Pairing(
        "branches",
        "same-seed branches: mango-base-prose and mango-base-code (continued from mango-base on prose only and "
        "code only; GPT-2, width 160) and mango-base",
        "branches-token",
        "lanes-branches",
        "lanes-branches-stitched",
    ),
}

# Single-stream routing: as the shipped fused-token run (adapters and routers, 800 steps of 8 x 256 tokens).
SINGLE = TrainConfig(
    steps=800,
    batch_size=8,
    seq_len=256,
    lr=3e-4,
    router_lr=1e-3,
    warmup=50,
    mixed_share=0.5,
    adapter_init="lstsq-zero-out",
    router_init="ridge",
    max_seconds=590,
    seed=0,
)
# Lanes: the gate (and the stitches) by the mixture's marginal likelihood, from the closed form.
LANES = TrainConfig(
    steps=300,
    batch_size=8,
    seq_len=512,
    lr=1e-3,
    router_lr=3e-3,
    warmup=20,
    mixed_share=0.5,
    router_init="ridge",
    stitch_init="lstsq",
    init_tokens=8192,
    max_seconds=590,
    seed=0,
)


def _smoke(c: TrainConfig) -> TrainConfig:
    return replace(c, steps=2, batch_size=2, seq_len=64, warmup=1, init_tokens=256, max_seconds=60)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def _recipe(name: str, mixture: str | None = None) -> mol.Recipe:
    path = RECIPES / f"{name}.yaml"
    recipe = mol.Recipe.from_file(path)
    if mixture is not None:
        data = recipe.to_dict()
        data["mixture"] = {"type": mixture}
        data["name"] = f"{recipe.name}-{mixture}"
        recipe = mol.Recipe.from_dict(data, source_dir=path.parent)
    return recipe


def flops(recipe: mol.Recipe) -> dict | None:
    """The plan's forward FLOPs per token and its ratio to each source alone (None where the plan has none)."""
    d = plan(recipe).to_dict()
    return d.get("flops_per_token")


def row(name: str, kind: str, report_row, params: int, seconds, hw, flop=None, note: str = "") -> dict:
    return {
        "row": name,
        "kind": kind,
        "perplexity": {d: r.perplexity for d, r in report_row.domains.items()},
        "loss": {d: r.loss for d, r in report_row.domains.items()},
        "tokens": {d: r.tokens for d, r in report_row.domains.items()},
        "agreement": {d: r.agreement for d, r in report_row.domains.items() if r.agreement},
        "trainable_parameters": params,
        "seconds": seconds,
        "hardware": hw,
        "flops": flop,
        "note": note,
    }


@torch.no_grad()
def best_lane_bound(model, tokens: dict, seq_len: int = SEQ_LEN, batch_size: int = 8) -> dict[str, dict]:
    """Per domain, the loss of a gate that puts all its weight on the lane best at each token (it knows the next
    token: a bound no gate reaches, not a model)."""
    out = {}
    model.eval()
    for dom, t in tokens.items():
        w = windows(t, seq_len)
        nll_sum, count = 0.0, 0
        for s in range(0, w.input_ids.shape[0], batch_size):
            ids = w.input_ids[s : s + batch_size].to(model.device)
            mask = w.attention_mask[s : s + batch_size].to(model.device).long()
            ctx = model.context(mask, ids.shape[1], mask, None)
            _, logp = model.run_lanes(ids, ctx)
            per_lane = -model.lane_token_logp(ids, logp)
            keep = (mask[:, 1:] * mask[:, :-1]).bool()
            nll_sum += float(per_lane.min(-1).values[keep].sum())
            count += int(keep.sum())
        loss = nll_sum / max(count, 1)
        out[dom] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    return out


def _train(recipe, config: TrainConfig, out: Path, reuse: bool, device: str) -> dict:
    """Train `recipe` into `out` (or, with `reuse`, read the run already there); returns its run file."""
    if not reuse:
        result = train(recipe, TRAIN, replace(config, device=device), out=out, progress=False)
        companion_paths(out)[2].unlink(missing_ok=True)  # optimizer state: for resuming, not shipped
        run_file = companion_paths(out)[1]
        run = json.loads(run_file.read_text())
        for d in run.get("data", {}).values():  # no path of this machine in a shipped file
            d["paths"] = [_rel(Path(x)) for x in d.get("paths", [])]
        run_file.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
        print(
            f"  trained {recipe.name}: {result.metrics['steps']} steps, {result.metrics['train_seconds']:.0f} s"
        )
    return json.loads(companion_paths(out)[1].read_text())


def _valid_loss(model, valid) -> float:
    report = evaluate(model, valid, sources=False, seq_len=SEQ_LEN)
    return sum(r.loss for r in report.rows[0].domains.values()) / len(valid)


def _closed_form(recipe, cfg, train_tokens, tokens, build, experts=None):
    """`recipe` built and initialised in closed form only; its evaluation (with every source alone the first time,
    when `experts` is not known yet) and the seconds the closed form took."""
    model = mol.build(recipe, **build)
    t0 = time.perf_counter()
    init = initialise(model, train_tokens, cfg)
    seconds = time.perf_counter() - t0
    report = evaluate(model, tokens, sources=experts is None, seq_len=SEQ_LEN, domain_experts=experts)
    return model, report, init, seconds


def run_pairing(p: Pairing, args, scratch: Path) -> dict:
    device, reuse, smoke = args.device, args.reuse, args.smoke
    single_cfg = replace(_smoke(SINGLE) if smoke else SINGLE, device=device)
    lanes_cfg = replace(_smoke(LANES) if smoke else LANES, device=device)
    max_tokens = 600 if smoke else args.max_tokens
    build = dict(device=device, dtype=torch.float32)
    print(f"{p.name}: {p.what}")
    lanes_recipe, token_recipe = _recipe(p.lanes), _recipe(p.lanes, "token")
    hw = hardware()
    rows: list[dict] = []

    # Each source alone, and the lanes in closed form only (no gradient step): the evidence gate (Bayes' rule,
    # its forgetting rate fitted) and, for comparison, the token gate read from the lanes' states (ridge).
    train_tokens, tokens, valid = _data(lanes_recipe, max_tokens)
    model, report, init, seconds = _closed_form(lanes_recipe, lanes_cfg, train_tokens, tokens, build)
    experts = report.domain_experts
    for r in report.rows:
        if r.kind == "source":
            alone = source_recipe(model, r.name.removesuffix(" alone"))
            rows.append(row(r.name, "source", r, 0, None, None, flops(alone)))
    lanes_flops, n_gate = flops(lanes_recipe), report.rows[0].trainable_parameters
    closed_rows = [
        row(
            "lanes + evidence mixture, closed form only (no training)",
            "lanes-closed-form",
            report.rows[0],
            n_gate,
            round(seconds, 1),
            hw,
            lanes_flops,
            "Bayes' rule over the lanes, its decay and scale fitted",
        ),
    ]
    del model
    _, report, _, seconds = _closed_form(token_recipe, lanes_cfg, train_tokens, tokens, build, experts)
    closed_rows.append(
        row(
            "lanes + token mixture, closed form only (no training)",
            "lanes-token-closed-form",
            report.rows[0],
            report.rows[0].trainable_parameters,
            round(seconds, 1),
            hw,
            flops(token_recipe),
            "gate fitted by ridge to the lanes' posterior of sample text's true next token",
        )
    )

    # Single-stream routing, one head: today's recipe.
    single = _recipe(p.single)
    w_single = (WEIGHTS if args.ship else scratch) / f"{p.single}.safetensors"
    if reuse and not w_single.exists():
        w_single = WEIGHTS / f"{p.single}.safetensors"
    run_single = _train(single, single_cfg, w_single, reuse and w_single.exists(), device)
    m = mol.build(single, weights=w_single, **build)
    r = evaluate(m, tokens, sources=False, seq_len=SEQ_LEN, domain_experts=experts).rows[0]
    rows.append(
        row(
            "single-stream token routing, trained (one head)",
            "single-stream",
            r,
            r.trainable_parameters,
            run_single["metrics"]["train_seconds"],
            run_single["hardware"],
            flops(single),
        )
    )
    del m
    rows += closed_rows

    # Lanes, trained from their closed form by the mixture's likelihood. The two evidence recipes are the
    # candidates to ship; the token and sequence gates are shown for comparison.
    candidates, runs = {}, {}
    for label, kind, recipe, ship_name in (
        ("lanes + token mixture, trained", "lanes-token", token_recipe, None),
        ("lanes + sequence mixture, trained", "lanes-sequence", _recipe(p.lanes, "sequence"), None),
        ("lanes + evidence mixture, trained", "lanes", lanes_recipe, p.lanes),
        ("lanes + stitches + evidence mixture, trained", "lanes-stitched", _recipe(p.stitched), p.stitched),
    ):
        w = scratch / f"{recipe.name}.safetensors"
        if reuse and ship_name and (WEIGHTS / f"{ship_name}.safetensors").exists():
            w = WEIGHTS / f"{ship_name}.safetensors"
        run = _train(recipe, lanes_cfg, w, reuse and w.exists(), device)
        m = mol.build(recipe, weights=w, **build)
        rep = evaluate(
            m, tokens, sources=False, oracle=kind == "lanes", seq_len=SEQ_LEN, domain_experts=experts
        )
        rows.append(
            row(
                label,
                kind,
                rep.rows[0],
                rep.rows[0].trainable_parameters,
                run["metrics"]["train_seconds"],
                run["hardware"],
                flops(recipe),
            )
        )
        if kind == "lanes":
            rows.append(
                row(
                    "oracle: the lanes' gate routed by the true domain label",
                    "oracle",
                    rep.rows[1],
                    n_gate,
                    None,
                    None,
                    lanes_flops,
                )
            )
            bound = best_lane_bound(m, tokens)
            rows.append(
                {
                    "row": "bound: the lane best on each next token (knows the answer)",
                    "kind": "bound",
                    "perplexity": {d: b["perplexity"] for d, b in bound.items()},
                    "loss": {d: b["loss"] for d, b in bound.items()},
                    "tokens": {d: b["tokens"] for d, b in bound.items()},
                    "agreement": {},
                    "trainable_parameters": 0,
                    "seconds": None,
                    "hardware": None,
                    "flops": lanes_flops,
                    "note": "",
                }
            )
        if ship_name:
            candidates[ship_name] = (_valid_loss(m, valid), w, label)
            runs[ship_name] = (run, rep.rows[0])
        del m

    shipped = min(candidates, key=lambda k: candidates[k][0])
    if args.ship:  # the best of the pairing ships, with this evaluation in its run file (the studio reads it)
        for name, (_, w, _) in candidates.items():
            weights_file, run_file = WEIGHTS / f"{name}.safetensors", WEIGHTS / f"{name}.train.json"
            if name != shipped:
                if not reuse:
                    weights_file.unlink(missing_ok=True)
                    run_file.unlink(missing_ok=True)
                continue
            if not reuse:
                shutil.copy(w, weights_file)
            elif Path(w).resolve() != weights_file.resolve():
                print(
                    f"  {name} is the best on validation now but was trained in this run: run without --reuse"
                )
                continue
            run, fused = runs[name]
            run["eval"] = {
                "perplexity": {d: x.perplexity for d, x in fused.domains.items()},
                "seq_len": SEQ_LEN,
                "by": "python -m bench.fusion",
            }
            run_file.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    result = {
        "pairing": p.name,
        "what": p.what,
        "recipes": {"single": p.single, "lanes": p.lanes, "stitched": p.stitched},
        "domain_experts": experts,
        "closed_form": init,
        "validation_loss": {k: v[0] for k, v in candidates.items()},
        "shipped": {"recipe": shipped, "row": candidates[shipped][2]},
        "train": {"single": asdict(single_cfg), "lanes": asdict(lanes_cfg)},
        "rows": rows,
    }
    result["bar"] = check_bar(result)
    return result


def _data(recipe, max_tokens):
    """A pairing's training, test and validation token streams (its lanes share one tokenizer: the plan checks)."""
    tok = next(iter(plan(recipe).sources.values())).load_tokenizer()
    return (
        tokenize_domains(tok, load_domains(TRAIN)),
        tokenize_domains(tok, load_domains(TEST), max_tokens=max_tokens),
        tokenize_domains(tok, load_domains(VALID), max_tokens=max_tokens or 16384),
    )


def check_bar(result: dict) -> dict:
    """The issue's bar for one pairing, from its rows."""
    sources = [r for r in result["rows"] if r["kind"] == "source"]
    shipped = next(r for r in result["rows"] if r["row"] == result["shipped"]["row"])
    closed = next(r for r in result["rows"] if r["kind"] == "lanes-closed-form")
    bar: dict = {"per_set": {}, "closed_form_gap": {}}
    for d in shipped["perplexity"]:
        best = min(sources, key=lambda s: s["loss"][d])
        ratio = shipped["perplexity"][d] / best["perplexity"][d]
        entry = {
            "best_source": best["row"],
            "best_ppl": best["perplexity"][d],
            "fused_ppl": shipped["perplexity"][d],
        }
        entry["ratio"] = ratio
        if "mixed" in d:
            entry["needs"] = "below every source"
            entry["met"] = ratio < 1.0
        else:
            entry["needs"] = "<= 1.05x the best source"
            entry["met"] = ratio <= 1.05
        bar["per_set"][d] = entry
    for d in ("prose", "code"):
        losses = [s["loss"][d] for s in sources]
        worse, better = max(losses), min(losses)
        share = (worse - closed["loss"][d]) / (worse - better) if worse > better else 1.0
        bar["closed_form_gap"][d] = {"share_of_loss_gap_closed": share, "met": share >= 0.5}
    bar["met"] = all(e["met"] for e in bar["per_set"].values()) and all(
        e["met"] for e in bar["closed_form_gap"].values()
    )
    return bar


def _fmt(x: float) -> str:
    return f"{x:,.2f}" if x < 1e4 else f"{x:,.0f}"


def _flops_cell(f: dict | None, costliest: float) -> str:
    """Forward FLOPs per token (the plan's, at its stated context) and the ratio to the pairing's costliest source."""
    if not f:
        return "–"
    cell = f"{f['prompt'] / 1e6:.1f} M ({f['prompt'] / costliest:.2f}x)"
    if f["generated"] != f["prompt"]:
        cell += f"; generating {f['generated'] / 1e6:.1f} M ({f['generated'] / costliest:.2f}x)"
    return cell


def table(result: dict) -> str:
    sets = list(result["rows"][0]["perplexity"])
    lines = [
        "| row | "
        + " | ".join(sets)
        + " | trainable params | FLOPs / token (x the costliest source) | training |",
        "|---|" + "---:|" * len(sets) + "---:|---|---|",
    ]
    costliest = max(r["flops"]["prompt"] for r in result["rows"] if r["kind"] == "source")
    for r in result["rows"]:
        mark = " **(shipped)**" if r["row"] == result["shipped"]["row"] else ""
        secs = "–" if r["seconds"] is None else f"{r['seconds']:.0f} s, {r['hardware']}"
        cells = " | ".join(_fmt(r["perplexity"][d]) for d in sets)
        lines.append(
            f"| {r['row']}{mark} | {cells} | {r['trainable_parameters']:,} | {_flops_cell(r['flops'], costliest)} | {secs} |"
        )
    lines += ["", f"Bar (shipped: `{result['shipped']['recipe']}`, chosen by validation loss):"]
    for d, b in result["bar"]["per_set"].items():
        lines.append(
            f"- {d}: {b['fused_ppl']:.2f} vs {b['best_source']} {b['best_ppl']:.2f} = {b['ratio']:.3f}x "
            f"(needs {b['needs']}): {'met' if b['met'] else 'NOT met'}"
        )
    for d, b in result["bar"]["closed_form_gap"].items():
        lines.append(
            f"- closed form alone closes {b['share_of_loss_gap_closed']:.0%} of the {d} loss gap between the worse "
            f"and the better source (needs >= 50%): {'met' if b['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def write_readme(results: dict, readme: Path) -> None:
    text = readme.read_text(encoding="utf-8") if readme.exists() else "<!-- RESULTS -->\n<!-- /RESULTS -->\n"
    parts = []
    for p in results["pairings"].values():
        parts.append(f"### {p['pairing']}: {p['what']}\n\n{table(p)}")
    block = "<!-- RESULTS -->\n" + "\n\n".join(parts) + "\n<!-- /RESULTS -->"
    text = re.sub(r"<!-- RESULTS -->.*?<!-- /RESULTS -->", lambda _: block, text, flags=re.S)
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fusion", description=__doc__.split("\n")[0])
    p.add_argument("--reuse", action="store_true", help="evaluate the shipped weights, do not train")
    p.add_argument(
        "--smoke", action="store_true", help="tiny settings (pipeline check; numbers mean nothing)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder for results and README (default: bench/fusion; with --out, "
        "no weights are written to assets/)",
    )
    p.add_argument("--pairings", default=",".join(PAIRINGS), help="comma-separated: " + ", ".join(PAIRINGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens per test set")
    a = p.parse_args(argv)
    a.ship = a.out is None and not a.smoke  # with --reuse: only the run files' evaluation is rewritten
    out = a.out or HERE
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "hardware": hardware(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": "python -m bench.fusion" + (" --reuse" if a.reuse else ""),
        "eval": {
            "seq_len": SEQ_LEN,
            "test": {d: [_rel(x) for x in ps] for d, ps in TEST.items()},
            "max_tokens": a.max_tokens,
        },
        "pairings": {},
    }
    if (out / "results.json").exists():  # a run of some pairings keeps the others' results
        results["pairings"] = json.loads((out / "results.json").read_text()).get("pairings", {})
    with tempfile.TemporaryDirectory() as scratch:
        for name in a.pairings.split(","):
            results["pairings"][name] = run_pairing(PAIRINGS[name], a, Path(scratch))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_readme(results, out / "README.md")
    for r in results["pairings"].values():
        print(table(r))
    bad = any(
        math.isnan(v) for pr in results["pairings"].values() for r in pr["rows"] for v in r["loss"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
