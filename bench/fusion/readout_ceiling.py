"""Readout ceiling: how well can another model's frozen head read a specialist's final hidden states?

A fused recipe has one head (its base's). For each domain, take the specialist's final (normed) hidden states on
training text, fit the best linear map into the input of another model's frozen head by cross-entropy (a
looser readout than any recipe gets, which must also pass the base's final norm), and measure test perplexity.
If even this ceiling is far above the specialist's own perplexity, no recipe with that head can match it."""

from __future__ import annotations

import math

import torch
from torch import nn


def _windows(tokenizer, path, n_tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(open(path, encoding="utf-8").read(), add_special_tokens=False, verbose=False)["input_ids"]
    n = min(len(ids), n_tokens) // seq_len * seq_len
    return torch.tensor(ids[:n]).view(-1, seq_len)


@torch.no_grad()
def _final_states(model, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat(
        [
            model(x[i : i + batch], output_hidden_states=True).hidden_states[-1]
            for i in range(0, len(x), batch)
        ]
    )


def _nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def readout_ceiling(
    specialist: str,
    head_model: str,
    train_path: str,
    test_path: str,
    train_tokens: int = 65536,
    test_tokens: int = 8192,
    epochs: int = 6,
    seq_len: int = 256,
    seed: int = 0,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(specialist)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    src, other = load(specialist), load(head_model)
    w_src = src.get_output_embeddings().weight.detach()
    w_head = other.get_output_embeddings().weight.detach()
    x_train, x_test = (
        _windows(tok, train_path, train_tokens, seq_len),
        _windows(tok, test_path, test_tokens, seq_len),
    )
    z_train, z_test = _final_states(src, x_train), _final_states(src, x_test)
    with torch.no_grad():
        own = math.exp(float(_nll(z_test @ w_src.T, x_test)))
        head_alone = math.exp(
            float(
                _nll(torch.cat([other(x_test[i : i + 16]).logits for i in range(0, len(x_test), 16)]), x_test)
            )
        )
    # Start from the logit-matching least-squares map, then minimise cross-entropy.
    m = nn.Parameter(torch.linalg.pinv(w_head) @ w_src)
    b = nn.Parameter(torch.zeros(w_head.shape[1]))
    opt = torch.optim.AdamW([m, b], lr=2e-3, weight_decay=0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(16):
            loss = _nll((z_train[idx] @ m.T + b) @ w_head.T, x_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        mapped = math.exp(float(_nll((z_test @ m.T + b) @ w_head.T, x_test)))
    return {
        "specialist": specialist,
        "head": head_model,
        "test_tokens": int(x_test.numel()),
        "train_tokens": int(x_train.numel()),
        "specialist_ppl": own,
        "head_model_alone_ppl": head_alone,
        "best_linear_readout_ppl": mapped,
    }


PAIRS = [  # (specialist, the model whose head reads it, the specialist's domain)
    ("mango-bard", "mango-base", "prose"),
    ("mango-coder", "mango-base", "code"),
    ("mango-bard", "mango-coder", "prose"),
    ("mango-coder", "mango-bard", "code"),
]


def main() -> int:
    """`python -m bench.fusion.readout_ceiling`: the table in bench/fusion/README.md, on the demo models."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    models, corpora = root / "assets" / "models", root / "assets" / "corpora"
    print("| specialist | head of | specialist alone | head's model alone | best linear readout |")
    print("|---|---|---:|---:|---:|")
    for s, h, d in PAIRS:
        c = readout_ceiling(
            str(models / s), str(models / h), str(corpora / d / "train.txt"), str(corpora / d / "test.txt")
        )
        print(
            f"| {s} | {h} | {c['specialist_ppl']:.2f} | {c['head_model_alone_ppl']:.2f} | "
            f"{c['best_linear_readout_ppl']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
