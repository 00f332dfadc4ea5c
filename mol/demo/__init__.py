"""The embedded demo family: tiny causal LMs that share one tokenizer, trained by `python -m mol.demo.train`.

- `mango-bard`: Llama-family prose specialist (Shakespeare only);
- `mango-coder`: GPT-NeoX code specialist (CPython standard library only), partial rotary;
- `mango-base`: GPT-2 generalist trained on both;
- `mango-base-prose`, `mango-base-code`: same-seed branches of mango-base, its shipped weights trained on
  further on one domain only (same architecture and width: the fine-tunes-of-one-base case of mergekit-moe and
  Branch-Train-MiX).

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

MODEL_NAMES = ("mango-bard", "mango-coder", "mango-base")  # trained from scratch by `fit`
BRANCH_NAMES = ("mango-base-prose", "mango-base-code")  # continued from mango-base by `branch`
FAMILY_NAMES = MODEL_NAMES + BRANCH_NAMES
DOMAINS = ("prose", "code")
EOS = "<|endoftext|>"

__all__ = [
    "ASSETS",
    "BENCH_DIR",
    "BRANCH_NAMES",
    "CORPORA_DIR",
    "DOMAINS",
    "EOS",
    "FAMILY_NAMES",
    "MODELS_DIR",
    "MODEL_NAMES",
    "RECIPES_DIR",
    "REPO_ROOT",
]
