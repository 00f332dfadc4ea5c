"""What several tabs share: the session's model workspace (architecture cards, never models), inline messages,
and the error boundary between user errors (shown inline) and bugs (one line, logged)."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import gradio as gr

from studio.engine import StudioEngine
from studio.errors import user_message
from studio.tabs.recipe_board import model_colors

F = TypeVar("F", bound=Callable[..., Any])


# ---- messages ---------------------------------------------------------------------------------------


def message_html(text: str, ok: bool = True) -> str:
    """An inline status line; errors get role=alert so screen readers announce them."""
    kind, role = ("ok", "status") if ok else ("error", "alert")
    return f'<div class="mango-status {kind}" role="{role}">{html.escape(text)}</div>'


__all__ = ["user_message"]  # re-exported: the tabs take the error boundary from here


def api_errors(fn: F) -> F:
    """For API endpoints: every failure becomes `gr.Error` with a message for people (a user error's own, or a
    generic line with an error id whose traceback is in the server log); the client never gets a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            # the traceback (of a bug) is logged by user_message under the error id; a user error needs none
            raise gr.Error(
                user_message(exc, f"the API endpoint {fn.__name__}"), print_exception=False
            ) from None

    return wrapper  # type: ignore[return-value]


def api_errors_stream(fn: F) -> F:
    """`api_errors` for a generator endpoint (its errors happen while it is iterated). Closing it (a client's
    cancel) closes `fn`'s generator, whose clean-up then runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(
                user_message(exc, f"the API endpoint {fn.__name__}"), print_exception=False
            ) from None

    return wrapper  # type: ignore[return-value]


def fmt_time(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


def fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---- the workspace: the models this session can use ----------------------------------------------------


def card_or_error(engine: StudioEngine, alias: str, ref: str) -> dict:
    try:
        return engine.model_card(alias, ref)
    except Exception as exc:
        return {"alias": alias, "ref": ref, "error": user_message(exc)}


def initial_workspace(engine: StudioEngine) -> list[dict]:
    return [card_or_error(engine, a, r) for a, r in engine.embedded_models().items()]


def workspace_refs(workspace: list[dict]) -> dict[str, str]:
    return {c["alias"]: c["ref"] for c in workspace or []}


def merge_models(engine: StudioEngine, workspace: list[dict], models: dict[str, str]) -> list[dict]:
    """The workspace with `models` (alias -> ref) present: new aliases are added, an alias bound to another
    reference is re-bound (the recipe being opened decides what its aliases mean)."""
    out = list(workspace or [])
    index = {c["alias"]: i for i, c in enumerate(out)}
    for alias, ref in models.items():
        if alias in index and out[index[alias]]["ref"] == ref:
            continue
        card = card_or_error(engine, alias, ref)
        if alias in index:
            out[index[alias]] = card
        else:
            out.append(card)
    return out


def palette_models(workspace: list[dict]) -> list[dict]:
    """What the palette and board draw for each usable model: alias, colour, layers."""
    usable = [c for c in workspace or [] if "error" not in c]
    colors = model_colors([c["alias"] for c in workspace or []])
    return [
        {
            "alias": c["alias"],
            "color": colors[c["alias"]],
            "layers": c["layers"],
            "family": c["family"],
            "width": c["width"],
        }
        for c in usable
    ]


def fusable_notes(workspace: list[dict]) -> dict[str, str]:
    """Per model: can it be fused with the others? Blocks fuse only between models sharing a vocabulary."""
    usable = [c for c in workspace or [] if "error" not in c]
    notes = {}
    for c in workspace or []:
        if "error" in c:
            notes[c["alias"]] = "no: " + c["error"]
            continue
        same = [
            o["alias"]
            for o in usable
            if o is not c and o.get("fingerprint") and o.get("fingerprint") == c.get("fingerprint")
        ]
        others = [o["alias"] for o in usable if o is not c]
        if not others:
            notes[c["alias"]] = "only model"
        elif not c.get("fingerprint"):
            notes[c["alias"]] = "unknown: no tokenizer files"
        elif same:
            notes[c["alias"]] = "yes, with " + ", ".join(same)
        else:
            notes[c["alias"]] = "no: its tokenizer differs from " + ", ".join(others)
    return notes
