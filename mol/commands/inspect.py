"""`mol inspect MODEL`: the architecture card of a local folder or Hub id."""

from __future__ import annotations

from mol.commands import print_json
from mol.sources import load_source


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="show a model's architecture card (family, layers, width, heads, params)"
    )
    p.add_argument("model", help="local model folder or Hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    src = load_source("model", args.model)
    card = src.card()
    if args.json:
        print_json(card)
        return 0
    print(f"{args.model}")
    for key in (
        "family",
        "model_type",
        "layers",
        "width",
        "heads",
        "kv_heads",
        "vocab_size",
        "parameters",
        "tokenizer",
    ):
        value = card[key]
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        print(f"  {key:<11} {value}")
    return 0
