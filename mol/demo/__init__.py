"""The embedded demo family: three tiny causal LMs that share one tokenizer, trained by `python -m mol.demo.train`.

- `mango-bard`: Llama-family prose specialist (Shakespeare only);
- `mango-coder`: GPT-NeoX code specialist (CPython standard library only), partial rotary;
- `mango-base`: GPT-2 generalist trained on both.

Nothing in this package imports the rest of `mol`: the shipped folders are plain Hugging Face checkpoints and the
training script uses transformers, tokenizers and torch alone.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "assets"
MODELS_DIR = ASSETS / "models"
CORPORA_DIR = ASSETS / "corpora"
RECIPES_DIR = ASSETS / "recipes"
BENCH_DIR = REPO_ROOT / "bench"

MODEL_NAMES = ("mango-bard", "mango-coder", "mango-base")
DOMAINS = ("prose", "code")
EOS = "<|endoftext|>"

__all__ = [
    "ASSETS",
    "BENCH_DIR",
    "CORPORA_DIR",
    "DOMAINS",
    "EOS",
    "MODELS_DIR",
    "MODEL_NAMES",
    "RECIPES_DIR",
    "REPO_ROOT",
]
