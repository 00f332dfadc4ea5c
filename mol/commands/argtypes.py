"""Checks of the commands' arguments: argparse `type=` functions (a bad option value ends in a one-line usage
error, exit 2, before any model is read), and `check_context` once the recipe is known. Never a traceback from
deep inside torch, or after an hour of training."""

from __future__ import annotations

import math
import os
from argparse import ArgumentTypeError
from collections.abc import Callable
from pathlib import Path


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high] (either bound may be open-ended)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ArgumentTypeError(f"'{text[:40]}' is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                limits = f"of at least {low}"
            elif low is None:
                limits = f"of at most {high}"
            else:
                limits = f"from {low} to {high}"
            raise ArgumentTypeError(f"{text[:40]} is out of range; give a whole number {limits}")
        return value

    return parse


def number(low: float, high: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """A finite number from `low` (above it, with `above`) up to `high` (NaN and infinities never pass)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ArgumentTypeError(f"'{text[:40]}' is not a number") from None
        if not math.isfinite(value):
            raise ArgumentTypeError(f"{text} is not a finite number")
        if (value <= low if above else value < low) or (high is not None and value > high):
            if high is None:
                limits = f"{'above' if above else 'at least'} {low:g}"
            else:
                limits = f"in {'(' if above else '['}{low:g}, {high:g}]"
            raise ArgumentTypeError(f"{text} is out of range; give a number {limits}")
        return value

    return parse


def size(value: str) -> int:
    """Bytes from 500MB, 10GB, 1.5GiB or a plain number; 0 is allowed (a limit of 0: none)."""
    from mol.export.shards import parse_size

    try:
        return parse_size(value, zero_ok=True)
    except ValueError as exc:
        raise ArgumentTypeError(str(exc).rstrip(".")) from None


def text(value: str) -> str:
    """Non-empty text (a prompt)."""
    if not value:
        raise ArgumentTypeError("empty; give some text")
    return value


def device(value: str) -> str:
    """A device this machine has (cpu, cuda, cuda:N), checked now rather than when the model is built."""
    from mol.errors import MolError
    from mol.placement import resolve_device

    try:
        resolve_device(value)
    except MolError as exc:
        raise ArgumentTypeError(str(exc).rstrip(".")) from None
    return value


def check_context(the_plan, tokens: int, what: str) -> None:
    """Refuse more tokens than the sources position: past it, learned position tables index out of range (and
    rotary models run where they were never trained)."""
    from mol.errors import ResourceError

    limits = [getattr(s.config, "max_position_embeddings", None) for s in the_plan.sources.values()]
    limit = min((n for n in limits if isinstance(n, int) and n > 0), default=None)
    if limit is not None and tokens > limit:
        raise ResourceError(
            f"{what} is {tokens} tokens, more than the {limit} positions the recipe's models know."
        )


def output_file(value: str) -> str:
    """A file that can be written: not a folder, and inside a writable folder (missing folders are created)."""
    path = Path(value)
    if not value:
        raise ArgumentTypeError("empty; give a file name")
    if path.is_dir():
        raise ArgumentTypeError(f"'{value}' is a folder; give a file name")
    parent = next(p for p in path.absolute().parents if p.exists())  # the nearest one that exists
    if not parent.is_dir():
        raise ArgumentTypeError(f"cannot write '{value}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentTypeError(f"cannot write '{value}': '{parent}' is read-only")
    return value
