"""One module per `mol` subcommand; each defines `register(subparsers)` and sets `func` on its parser."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
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


def add_config_options(
    parser, config_class, type_for: Mapping[str, Callable[[str], object]] | None = None
) -> None:
    """One option per field of the dataclass `config_class`, `--field-name` (dest: the field's name), with the
    field's default and its metadata's help text; numbers checked against the metadata's `low` / `high` (`above`:
    low excluded), text against its `choices`; booleans as --x / --no-x. `type_for` gives a field its own
    argparse type function instead."""
    from mol.commands import argtypes

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{config_class.__name__}.{f.name} has no default, so it cannot be an option.")
        kind = _value_type(hints[f.name])
        option = {
            "dest": f.name,
            "default": default,
            "help": (meta.get("help") or "").replace("%", "%%") or None,
        }
        if type_for and f.name in type_for:
            option["type"] = type_for[f.name]
        elif kind is bool:
            option["action"] = argparse.BooleanOptionalAction
        elif "choices" in meta:
            option["choices"] = tuple(meta["choices"])
        elif kind is int:
            option["type"] = argtypes.integer(meta.get("low"), meta.get("high"))
        elif kind is float:
            low = meta.get("low", -math.inf)
            option["type"] = argtypes.number(low, meta.get("high"), above=meta.get("above", False))
        elif kind is str:
            option["type"] = str
        else:
            raise TypeError(
                f"{config_class.__name__}.{f.name}: no option for a field of type {hints[f.name]}."
            )
        parser.add_argument("--" + f.name.replace("_", "-"), **option)


def config_from_args(config_class, args, **given):
    """The `config_class` instance of the options `add_config_options` made (`given` overrides fields)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    return config_class(**{**values, **given})


def _value_type(hint):
    """int for `int` and `int | None` (Optional[int]); the type itself for any other plain type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


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
