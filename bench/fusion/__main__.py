"""Fusion bench: does a fused recipe of the demo models beat its sources? One command rebuilds everything:

    python -m bench.fusion                 # train both recipes (CPU, <= 10 min each), evaluate, write the table
    python -m bench.fusion --reuse         # evaluate the shipped weights again (no training)
    python -m bench.fusion --smoke --out D # seconds-long run on a few hundred tokens (checks the pipeline only)

Writes bench/fusion/results.json and the table in bench/fusion/README.md (between the RESULTS markers), and the
trained weights to assets/weights/. Every row reads exactly the same test tokens."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mol  # noqa: E402
from mol.data import load_domains, tokenize_domains  # noqa: E402
from mol.evaluation import evaluate, score  # noqa: E402
from mol.router_init import init_routers  # noqa: E402
from mol.training import TrainConfig, companion_paths, hardware, initialise, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CORPORA = ROOT / "assets" / "corpora"
RECIPES = {
    "token": ROOT / "assets" / "recipes" / "fused-token.yaml",
    "pooled": ROOT / "assets" / "recipes" / "fused-pooled.yaml",
}
WEIGHTS = ROOT / "assets" / "weights"
TRAIN = {"prose": [CORPORA / "prose" / "train.txt"], "code": [CORPORA / "code" / "train.txt"]}
TEST = {
    "prose": [CORPORA / "prose" / "test.txt"],
    "code": [CORPORA / "code" / "test.txt"],
    "mixed": [CORPORA / "mixed_test.txt"],
}
SEQ_LEN = 512  # evaluation windows, as in bench/demo_family.md

# The training run of both shipped recipes: CPU, at most ten minutes of optimisation each.
CONFIG = TrainConfig(
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
    device="cpu",
)
SMOKE = TrainConfig(
    steps=3,
    batch_size=2,
    seq_len=64,
    warmup=1,
    mixed_share=0.5,
    adapter_init="lstsq-zero-out",
    router_init="ridge",
    init_tokens=256,
    seed=0,
    device="cpu",
)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def _row(
    name: str,
    kind: str,
    per_domain: dict,
    params: int,
    seconds: float | None,
    hw: str | None,
    agreement: dict | None = None,
) -> dict:
    return {
        "row": name,
        "kind": kind,
        "perplexity": {d: r["perplexity"] for d, r in per_domain.items()},
        "loss": {d: r["loss"] for d, r in per_domain.items()},
        "tokens": {d: r["tokens"] for d, r in per_domain.items()},
        "agreement": agreement or {},
        "trainable_parameters": params,
        "seconds": seconds,
        "hardware": hw,
    }


def _mean_agreement(domains: dict) -> dict:
    out = {}
    for d, r in domains.items():
        if r["agreement"]:
            out[d] = sum(r["agreement"].values()) / len(r["agreement"])
    return out


def _scores(model, tokens, experts) -> dict:
    return {d: asdict(score(model, t, SEQ_LEN, 8, experts)) for d, t in tokens.items()}


def run(weights_dir: Path, reuse: bool, smoke: bool, max_tokens: int | None) -> dict:
    config = SMOKE if smoke else CONFIG
    torch.set_num_threads(torch.get_num_threads())
    hw = hardware()
    results: dict = {
        "hardware": hw,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "eval": {
            "seq_len": SEQ_LEN,
            "test": {d: [_rel(p) for p in ps] for d, ps in TEST.items()},
            "max_tokens": max_tokens,
        },
        "train": {"config": asdict(config), "data": {d: [_rel(p) for p in ps] for d, ps in TRAIN.items()}},
        "rows": [],
    }
    runs = {}
    for kind, recipe_path in RECIPES.items():
        w = weights_dir / f"fused-{kind}.safetensors"
        if not reuse:
            t0 = time.perf_counter()
            result = train(recipe_path, TRAIN, config, out=w, progress=True)
            print(
                f"{kind}: {result.metrics['steps']} steps in {time.perf_counter() - t0:.0f} s (wall, with init)"
            )
            companion_paths(w)[2].unlink(missing_ok=True)  # optimizer state: for resuming, not shipped
        runs[kind] = json.loads(companion_paths(w)[1].read_text())

    recipe = mol.Recipe.from_file(RECIPES["token"])
    trained = mol.build(
        recipe, device="cpu", dtype=torch.float32, weights=weights_dir / "fused-token.safetensors"
    )
    tokens = tokenize_domains(trained.tokenizer, load_domains(TEST), max_tokens=max_tokens)
    report = evaluate(trained, tokens, sources=True, oracle=True, seq_len=SEQ_LEN)
    experts = report.domain_experts
    results["domain_experts"] = experts
    params = report.rows[0].trainable_parameters
    token_run = runs["token"]
    for r in report.rows:
        if r.kind == "source":
            results["rows"].append(
                _row(r.name, "source", {d: asdict(x) for d, x in r.domains.items()}, 0, None, None)
            )

    # Closed-form initialisation alone (no gradient steps): the one training starts from, and mol.calibrate's full
    # least-squares adapters for comparison.
    train_tokens = tokenize_domains(trained.tokenizer, load_domains(TRAIN))
    for name, adapter_init in (
        ("closed-form initialisation only (no training)", config.adapter_init),
        ("closed form with full least-squares adapters (no training)", "lstsq"),
    ):
        fresh = mol.build(recipe, device="cpu", dtype=torch.float32)
        t0 = time.perf_counter()
        initialise(
            fresh,
            train_tokens,
            TrainConfig(
                adapter_init=adapter_init,
                router_init="ridge",
                init_tokens=config.init_tokens,
                seed=config.seed,
            ),
            experts,
        )
        seconds = time.perf_counter() - t0
        scores = _scores(fresh, tokens, experts)
        kind = "closed-form" if adapter_init == config.adapter_init else "closed-form-full"
        results["rows"].append(
            _row(name, kind, scores, params, round(seconds, 1), hw, _mean_agreement(scores))
        )

    # Random router: the trained token recipe with its routers replaced by random ones (what routing is worth).
    shuffled = mol.build(
        recipe, device="cpu", dtype=torch.float32, weights=weights_dir / "fused-token.safetensors"
    )
    init_routers(shuffled, "random", seed=config.seed)
    scores = _scores(shuffled, tokens, experts)
    results["rows"].append(
        _row(
            "random router (trained adapters)",
            "random",
            scores,
            params,
            token_run["metrics"]["train_seconds"],
            token_run["hardware"],
            _mean_agreement(scores),
        )
    )

    fused = {d: asdict(x) for d, x in report.rows[0].domains.items()}
    results["rows"].append(
        _row(
            "trained token router",
            "token",
            fused,
            params,
            token_run["metrics"]["train_seconds"],
            token_run["hardware"],
            _mean_agreement(fused),
        )
    )
    pooled_run = runs["pooled"]
    pooled = mol.build(
        mol.Recipe.from_file(RECIPES["pooled"]),
        device="cpu",
        dtype=torch.float32,
        weights=weights_dir / "fused-pooled.safetensors",
    )
    pooled_scores = _scores(pooled, tokens, experts)
    results["rows"].append(
        _row(
            "trained pooled router",
            "pooled",
            pooled_scores,
            params,
            pooled_run["metrics"]["train_seconds"],
            pooled_run["hardware"],
            _mean_agreement(pooled_scores),
        )
    )
    oracle = {d: asdict(x) for d, x in report.rows[1].domains.items()}
    results["rows"].append(
        _row(
            "oracle: trained token recipe routed by the true label",
            "oracle",
            oracle,
            params,
            token_run["metrics"]["train_seconds"],
            token_run["hardware"],
            _mean_agreement(oracle),
        )
    )
    results["train"]["runs"] = {
        k: {
            "steps": v["metrics"]["steps"],
            "train_seconds": v["metrics"]["train_seconds"],
            "tokens": v["metrics"]["tokens"],
            "final_loss": v["metrics"]["final_loss"],
            "hardware": v["hardware"],
            "init": v.get("init", {}).get("router_fit"),
        }
        for k, v in runs.items()
    }
    results["bar"] = check_bar(results)
    return results


def check_bar(results: dict) -> dict:
    """The issue's acceptance bar, computed from the rows."""
    rows = {r["row"]: r for r in results["rows"]}
    sources = [r for r in results["rows"] if r["kind"] == "source"]
    experts = results["domain_experts"]
    token = next(r for r in results["rows"] if r["kind"] == "token")
    closed = next(r for r in results["rows"] if r["kind"] == "closed-form")
    bar: dict = {"per_domain": {}, "closed_form_gap": {}}
    for d, alias in experts.items():
        specialist = rows[f"{alias} alone"]["perplexity"][d]
        ratio = token["perplexity"][d] / specialist
        bar["per_domain"][d] = {
            "specialist": alias,
            "specialist_ppl": specialist,
            "fused_ppl": token["perplexity"][d],
            "ratio": ratio,
            "met": ratio <= 1.05,
        }
        losses = [s["loss"][d] for s in sources]
        worse, better = max(losses), min(losses)
        closed_share = (worse - closed["loss"][d]) / (worse - better) if worse > better else 1.0
        bar["closed_form_gap"][d] = {"share_of_loss_gap_closed": closed_share, "met": closed_share >= 0.5}
    best_mixed = min(s["perplexity"]["mixed"] for s in sources)
    bar["mixed"] = {
        "fused_ppl": token["perplexity"]["mixed"],
        "best_source_ppl": best_mixed,
        "met": token["perplexity"]["mixed"] < best_mixed,
    }
    bar["training_within_10_minutes"] = token["seconds"] is not None and token["seconds"] <= 600
    return bar


def _fmt(x: float) -> str:
    return f"{x:,.2f}" if x < 1e4 else f"{x:,.0f}"


def table(results: dict) -> str:
    lines = [
        "| row | prose | code | mixed | agreement (prose / code / mixed) | trainable params | training | hardware |",
        "|---|---:|---:|---:|---|---:|---|---|",
    ]
    for r in results["rows"]:
        ppl = r["perplexity"]
        agree = " / ".join(
            f"{r['agreement'][d]:.0%}" if d in r["agreement"] else "–" for d in ("prose", "code", "mixed")
        )
        if r["kind"] == "source":
            agree = "–"
        trained = r["kind"] in ("token", "pooled", "oracle", "random")
        secs = (
            "–"
            if r["seconds"] is None
            else (f"{r['seconds']:.0f} s" if trained else f"{r['seconds']:.0f} s closed form")
        )
        lines.append(
            f"| {r['row']} | {_fmt(ppl['prose'])} | {_fmt(ppl['code'])} | {_fmt(ppl['mixed'])} | {agree} | "
            f"{r['trainable_parameters']:,} | {secs} | {r['hardware'] or '–'} |"
        )
    bar = results["bar"]
    lines.append("")
    lines.append("Bar:")
    for d, b in bar["per_domain"].items():
        lines.append(
            f"- {d}: trained token recipe {b['fused_ppl']:.2f} vs {b['specialist']} alone "
            f"{b['specialist_ppl']:.2f} = {b['ratio']:.2f}x (needs <= 1.05x): {'met' if b['met'] else 'NOT met'}"
        )
    m = bar["mixed"]
    lines.append(
        f"- mixed: {m['fused_ppl']:.2f} vs best source {m['best_source_ppl']:.2f}: "
        f"{'met' if m['met'] else 'NOT met'}"
    )
    for d, b in bar["closed_form_gap"].items():
        lines.append(
            f"- closed form alone closes {b['share_of_loss_gap_closed']:.0%} of the {d} loss gap between the "
            f"worse and the better source (needs >= 50%): {'met' if b['met'] else 'NOT met'}"
        )
    lines.append(
        f"- training within 10 minutes of CPU: {'met' if bar['training_within_10_minutes'] else 'NOT met'}"
    )
    ceiling = results.get("readout_ceiling")
    if ceiling:
        lines.append("")
        lines.append(
            "Readout ceiling (best linear map from a specialist's final states into another model's frozen "
            'head, fitted by cross-entropy; see "Why the per-domain bar" below):'
        )
        lines.append("")
        lines.append("| specialist | head of | specialist alone | head's model alone | best linear readout |")
        lines.append("|---|---|---:|---:|---:|")
        for c in ceiling:
            lines.append(
                f"| {Path(c['specialist']).name} | {Path(c['head']).name} | {c['specialist_ppl']:.2f} | "
                f"{c['head_model_alone_ppl']:.2f} | {c['best_linear_readout_ppl']:.2f} |"
            )
    return "\n".join(lines)


def write_readme(results: dict, readme: Path) -> None:
    text = readme.read_text(encoding="utf-8") if readme.exists() else "<!-- RESULTS -->\n<!-- /RESULTS -->\n"
    block = f"<!-- RESULTS -->\n{table(results)}\n<!-- /RESULTS -->"
    text = re.sub(r"<!-- RESULTS -->.*?<!-- /RESULTS -->", lambda _: block, text, flags=re.S)
    readme.write_text(text, encoding="utf-8")


def ceilings(smoke: bool) -> list[dict]:
    from bench.fusion.readout_ceiling import readout_ceiling

    models = ROOT / "assets" / "models"
    n = dict(train_tokens=1024, test_tokens=512, epochs=1) if smoke else {}
    pairs = [
        ("mango-bard", "mango-base", "prose"),
        ("mango-coder", "mango-base", "code"),
        ("mango-bard", "mango-coder", "prose"),
        ("mango-coder", "mango-bard", "code"),
    ]
    return [
        readout_ceiling(
            str(models / s),
            str(models / h),
            str(CORPORA / d / "train.txt"),
            str(CORPORA / d / "test.txt"),
            **n,
        )
        for s, h, d in pairs
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fusion", description=__doc__.split("\n")[0])
    p.add_argument("--reuse", action="store_true", help="evaluate the shipped weights, do not train")
    p.add_argument(
        "--smoke", action="store_true", help="tiny settings (pipeline check; numbers mean nothing)"
    )
    p.add_argument(
        "--out", type=Path, help="folder for results and weights (default: bench/fusion, assets/weights)"
    )
    p.add_argument("--no-ceiling", action="store_true", help="skip the readout-ceiling probe")
    a = p.parse_args(argv)
    out = a.out or HERE
    weights = (a.out / "weights") if a.out else WEIGHTS
    out.mkdir(parents=True, exist_ok=True)
    results = run(weights, a.reuse, a.smoke, max_tokens=600 if a.smoke else None)
    if not a.no_ceiling:
        results["readout_ceiling"] = ceilings(a.smoke)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_readme(results, out / "README.md")
    print(table(results))
    return 0 if not any(math.isnan(v) for r in results["rows"] for v in r["perplexity"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
