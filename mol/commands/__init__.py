"""One module per `mol` subcommand; each defines `register(subparsers)` and sets `func` on its parser."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mol.errors import RecipeError
from mol.recipe import Recipe


def load_recipe(arg: str) -> Recipe:
    """A recipe from a YAML file (or '-' for standard input)."""
    if arg == "-":
        return Recipe.from_yaml(sys.stdin.read())
    path = Path(arg)
    if not path.exists():
        raise RecipeError(f"Recipe file '{arg}' does not exist.")
    return Recipe.from_yaml(path)


def add_allow_bin(parser) -> None:
    parser.add_argument("--allow-bin", action="store_true",
                        help="also load PyTorch pickle (.bin) weights; only for files you trust")


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
