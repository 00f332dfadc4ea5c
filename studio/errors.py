"""The studio's error boundary. A user error (`MolError`) is shown as its own message; anything else is a bug:
its traceback goes to the server log under a short error id, and the person sees one generic line with that id.
Request arguments from the API are checked here too, so a wrong type or an absurd number is a user error with a
message, not a `ValueError` from deep inside."""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

from mol.errors import MolError, RecipeError
from mol.recipe import parse_yaml

log = logging.getLogger("studio")

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML_NODES_MAX = 100_000  # after anchors and aliases are expanded: a recipe has a few hundred


class InputError(MolError):
    """A request argument of the wrong type, out of range, or too long."""


class ReportedError(MolError):
    """A bug already logged under an error id; its message is the generic line to show (raised where the
    message must also be stored, so that the error is logged once, under one id)."""


def public_text(message: str) -> str:
    """A message as it may be shown in a browser: paths under the studio's own folder are written relative to
    it (the folder layout of the server is nobody's business, and means nothing to the reader)."""
    root = str(REPO_ROOT)
    return message.replace(root + "/", "").replace(root, ".")


def report_internal(exc: BaseException, context: str = "a studio callback") -> str:
    """Log an unexpected exception with its traceback under a new error id; the message to show instead."""
    error_id = secrets.token_hex(4)
    log.error("error %s in %s", error_id, context, exc_info=(type(exc), exc, exc.__traceback__))
    return (
        f"Something went wrong inside the studio (error id {error_id}). The details are in the server log; "
        "quote the id if you report it."
    )


def user_message(exc: BaseException, context: str = "a studio callback") -> str:
    """The text to show for an exception: a user error's own message, else a generic line with an error id."""
    if isinstance(exc, MolError):
        return public_text(str(exc))
    if isinstance(exc, RecursionError):  # a structure nested thousands deep is the input's fault, not a bug
        return "The input is nested too deeply to read."
    return report_internal(exc, context)


# ---- request arguments --------------------------------------------------------------------------------

INT64 = 2**63 - 1


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value[:40] + ("…" if len(value) > 40 else ""))
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return {dict: "a mapping", list: "a list", tuple: "a list"}.get(type(value), "a value of another kind")


def whole(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer argument: an int, an integral float or a numeric string, within [lo, hi] where given."""
    n: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdecimal() and len(value) < 30:
        n = int(value.strip())
    if n is None:
        raise InputError(f"{what} must be a whole number, got {_shown(value)}.")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        bounds = (
            f"between {lo} and {hi}"
            if lo is not None and hi is not None
            else (f"at least {lo}" if lo is not None else f"at most {hi}")
        )
        raise InputError(f"{what} must be {bounds}, got {n}.")
    return n


def record_id(value: Any, what: str) -> int:
    """The id of a stored record ("recipe version", "run"): a whole number; one the database cannot hold names
    nothing, as an unused id does."""
    n = whole(value, f"The {what} id")
    if not -INT64 <= n <= INT64:
        raise InputError(f"There is no {what} with id {n}.")
    return n


def real(value: Any, what: str) -> float:
    """A finite number argument (ranges are the caller's: sampling settings are clamped, not refused)."""
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, int):
        value = float(value) if abs(value) < 2**1023 else math.inf
    elif isinstance(value, str):
        try:
            value = float(value.strip()) if len(value) < 40 else math.nan
        except ValueError:
            pass
    if not isinstance(value, float) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {_shown(value)}.")
    return value


def flag(value: Any, what: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise InputError(f"{what} must be true or false, got {_shown(value)}.")


def text(value: Any, what: str, max_chars: int, allow_none: bool = True) -> str:
    """A text argument of at most `max_chars` characters, without NUL characters (no file name, database
    column or tokenizer wants one)."""
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{what} must be text, got {_shown(value)}.")
    if len(value) > max_chars:
        raise InputError(f"{what} is at most {max_chars:,} characters; this one has {len(value):,}.")
    if "\x00" in value:
        raise InputError(f"{what} contains a NUL character.")
    return value


def names(value: Any, what: str, max_items: int = 64) -> list[str]:
    """A list of short names (a single name is taken as a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or len(value) > max_items:
        raise InputError(f"{what} must be a list of at most {max_items} names, got {_shown(value)}.")
    return [text(v, f"Each of {what.lower()}", 200, allow_none=False) for v in value]


def recipe_text(value: Any, max_chars: int) -> str:
    """Recipe YAML as the API receives it: text, of a sane size, and small once its YAML anchors and aliases
    are expanded (a few lines of aliases can stand for a billion nodes, and every later step would walk them)."""
    value = text(value, "The recipe YAML", max_chars, allow_none=False)
    data = parse_yaml(value)  # one-line RecipeError: bad YAML (with the position), deep nesting, huge numbers
    budget = [YAML_NODES_MAX]

    def walk(node: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or depth > 100:
            raise RecipeError(
                "The recipe YAML expands to far more than a recipe holds (anchors and aliases "
                "repeated, or nesting too deep); write the recipe out plainly."
            )
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)

    walk(data, 0)
    return value
