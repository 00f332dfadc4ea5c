"""What several tabs share: views of the session's model workspace (architecture cards, never models), inline
messages, formatting, and the error boundary between user errors (shown inline) and bugs (one line, logged).
Tabs import from here, never from each other."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from studio import figures
from studio.controller import fmt_time
from studio.draft_recipe import model_colors
from studio.errors import user_message

F = TypeVar("F", bound=Callable[..., Any])


# ---- messages ---------------------------------------------------------------------------------------


def message_html(text: str, ok: bool = True) -> str:
    """An inline status line; errors get role=alert so screen readers announce them."""
    kind, role = ("ok", "status") if ok else ("error", "alert")
    return f'<div class="mango-status {kind}" role="{role}">{html.escape(text)}</div>'


BUSY_TICK_S = 1.0  # how often a page reads a running job's progress (Train, Evaluate)
IDLE_TICK_S = 3.0  # and looks for one (after a reload, or another page's job) while none is shown


def job_html(ctl, job) -> str:
    """A job's status line with its own progress bar (one bar: Gradio's own draws over every output)."""
    html_ = message_html(ctl.job_line(job), ok=job.state != "failed")
    if job.state == "running" and job.steps:
        html_ += (
            f'<progress class="job-progress" value="{job.step}" max="{job.steps}" '
            f'aria-label="{job.step} of {job.steps}"></progress>'
        )
    return html_


def stop_job_callback(ctl, kind: str, what: str, status, timer) -> Callable[[Any], dict]:
    """The Stop button's callback of a tab's long job (`kind`: "train" or "evaluate"; `what` names it for
    people: "training"): it stops the job the tab shows and says so in `status`, reading it again soon."""

    def on_stop(job_id_v):
        try:
            job = ctl.shown_job(kind, job_id_v)
            if job is None or not job.active:
                return {status: message_html(f"No {what} is running.")}
            job = ctl.stop_job(job.id)
        except Exception as exc:
            return {status: message_html(user_message(exc), ok=False)}
        return {status: job_html(ctl, job), timer: gr.Timer(BUSY_TICK_S)}

    return on_stop


__all__ = ["fmt_time", "user_message"]  # re-exported: the tabs take the error boundary from here


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


def workspace_refs(workspace: list[dict]) -> dict[str, str]:
    return {c["alias"]: c["ref"] for c in workspace or []}


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


def trace_colors(workspace: list[dict] | None, trace: dict | None) -> dict[str, str]:
    """Colours by the workspace's model order (as the palette draws them), so chips and plots agree."""
    aliases = [c["alias"] for c in workspace or []]
    lanes = (trace or {}).get("lanes") or {}  # a lanes model's mixture row: lane name -> its base model
    for s in (trace or {}).get("slots") or []:
        aliases += [e.rsplit(":", 1)[0] for e in s.get("experts") or [] if e not in lanes]
    colors = model_colors(list(dict.fromkeys([*aliases, *lanes.values()])))
    for lane, base in lanes.items():  # a lane is drawn in its base model's colour
        if isinstance(base, str) and base in colors:
            colors[lane] = colors[base]
    return colors


# how to read the routing heatmap, in a line that fits a phone (hover a cell for every gate probability)
HEATMAP_TITLE = "Chosen expert per token · pale: an undecided gate"


def figures_for(trace: dict | None, colors: dict[str, str], expected_tokens: int | None = None):
    """The routing heatmap and the expert load of a trace (or of a generation's trace so far: `expected_tokens`
    keeps the heatmap's x range that of the whole run while it streams)."""
    trace = trace or {"tokens": [], "slots": []}
    heatmap = figures.routing_heatmap(
        trace, colors=colors, title=HEATMAP_TITLE, expected_tokens=expected_tokens
    )
    return heatmap, figures.expert_load(trace, colors=colors)
