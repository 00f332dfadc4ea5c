"""One module per `mol` subcommand; each defines `register(subparsers)` and sets `func` on its parser."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mol.access import AccessPolicy
from mol.recipe import Recipe


def load_recipe(arg: str) -> Recipe:
    """A recipe from a YAML file (or '-' for standard input); a missing file, a folder or a file that is not
    UTF-8 text is a one-line RecipeError."""
    if arg == "-":
        return Recipe.from_yaml(sys.stdin.read())
    return Recipe.from_file(Path(arg))


def add_data(parser) -> None:
    """`--data NAME=PATH[,PATH]`, as `mol train` and `mol eval` both take it."""
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH[,PATH]",
        help="a domain's text files or folders (repeat per domain)",
    )


def add_allow_bin(parser) -> None:
    parser.add_argument(
        "--allow-bin",
        action="store_true",
        help="also load PyTorch pickle (.bin) weights; only for files you trust",
    )


def access_policy(args) -> AccessPolicy:
    """The access policy a command runs under: local use, with pickles only when `--allow-bin` is given."""
    return AccessPolicy(allow_bin=bool(getattr(args, "allow_bin", False)))


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
