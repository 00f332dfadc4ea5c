"""Plotly figures of routing traces and training runs (graph objects only, no plotly.express).

Input of the routing figures is the JSON-safe dict of `mol.trace.Trace.to_dict()`:
`{"tokens": [str], "token_ids": [int], "slots": [{"slot", "router", "experts", "probs", "chosen", "load"}]}`.

Colours: every source model (the alias before the colon of an expert name such as "bard:3") has one colour,
from `model_colors`; several experts of the same model in one figure get shades of it. Pass the studio's
`model_colors(recipe aliases)` as `colors=` so layer chips and plots agree.

Gradio 6 bundles plotly.js 3: titles are set as `title.text`, nothing deprecated (`titlefont`, `titleside`)."""

from __future__ import annotations

import colorsys
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Tableau 10: distinct, readable on light and dark backgrounds.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
_FONT = {"family": "Inter, ui-sans-serif, system-ui, sans-serif", "size": 12}
MAX_TICK_LABELS = 80


# ---------------------------------------------------------------------------------------------- colours


def _hex(r: float, g: float, b: float) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(max(0, min(255, round(c * 255))) for c in (r, g, b)))


def _rgb(color: str) -> tuple[float, float, float]:
    c = color.lstrip("#")
    return int(c[0:2], 16) / 255, int(c[2:4], 16) / 255, int(c[4:6], 16) / 255


def model_colors(aliases: Iterable[str]) -> dict[str, str]:
    """One hex colour per model alias, in the order given (duplicates ignored): the palette first, then
    evenly spread hues. The same list always gives the same colours."""
    out: dict[str, str] = {}
    for alias in aliases:
        if alias in out:
            continue
        i = len(out)
        if i < len(PALETTE):
            out[alias] = PALETTE[i]
        else:  # golden-angle hues, alternating lightness, so colours stay apart however many models
            h = (i * 0.618033988749895) % 1.0
            out[alias] = _hex(*colorsys.hls_to_rgb(h, 0.45 if i % 2 else 0.6, 0.55))
    return out


def _shade(color: str, t: float) -> str:
    """t in [-1, 1]: towards black (negative) or white (positive)."""
    r, g, b = _rgb(color)
    target = 1.0 if t > 0 else 0.0
    a = abs(t)
    return _hex(r + (target - r) * a, g + (target - g) * a, b + (target - b) * a)


def alias_of(expert: str) -> str:
    """ "bard:3" -> "bard" (an expert name without a colon is its own alias)."""
    return expert.rsplit(":", 1)[0] if ":" in expert else expert


def _layer_key(expert: str) -> tuple[int, str]:
    tail = expert.rsplit(":", 1)[-1]
    return (int(tail), expert) if tail.lstrip("-").isdigit() else (0, expert)


def expert_colors(experts: Sequence[str], colors: Mapping[str, str] | None = None) -> dict[str, str]:
    """A colour per expert name: its model's colour, shaded when one model has several experts here."""
    base = dict(model_colors(alias_of(e) for e in experts))
    if colors:
        base.update({a: c for a, c in colors.items() if a in base})
    by_alias: dict[str, list[str]] = {}
    for e in dict.fromkeys(experts):
        by_alias.setdefault(alias_of(e), []).append(e)
    out: dict[str, str] = {}
    for alias, names in by_alias.items():
        names.sort(key=_layer_key)
        for k, name in enumerate(names):
            # the lowest layer keeps the model's own colour; later ones alternate lighter / darker
            step = (k + 1) // 2
            out[name] = (
                base[alias] if k == 0 else _shade(base[alias], 0.75 * (1 - 0.6**step) * (1 if k % 2 else -1))
            )
    return out


# ---------------------------------------------------------------------------------------------- text


def visible_token(token: str, max_chars: int | None = None) -> str:
    """Token text as shown on an axis or in a hover: whitespace made visible, HTML-escaped (plotly renders a
    subset of HTML in labels), optionally shortened."""
    if token == "":
        return "∅"
    shown = (
        token.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥").replace(" ", "·")
    )
    if max_chars is not None and len(shown) > max_chars:
        shown = shown[: max_chars - 1] + "…"
    return html.escape(shown, quote=False)


def format_prob(p: float | None) -> str:
    """How gate probabilities are written in hovers."""
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.4f}"


def _empty(message: str, title: str, height: int = 220) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14}
    )
    fig.update_layout(
        title={"text": title},
        height=height,
        font=_FONT,
        template="plotly_white",
        xaxis={"visible": False},
        yaxis={"visible": False},
        margin={"l": 20, "r": 20, "t": 50, "b": 20},
    )
    return fig


def _slot_label(slot: Mapping[str, Any]) -> str:
    label = f"slot {slot.get('slot', '?')}"
    return label + " (pooled)" if slot.get("router") == "pooled" else label


# ---------------------------------------------------------------------------------------------- figures


def router_heatmap(
    trace: Mapping[str, Any],
    colors: Mapping[str, str] | None = None,
    title: str = "Router decisions per token",
    max_label_chars: int = 12,
) -> go.Figure:
    """Tokens (x, by position 0..T-1 with the token text as tick labels, so repeated tokens stay apart) ×
    routed slots (y). Each cell is coloured by the slot's top-1 expert for that token; the colour bar names the
    experts; the hover shows the token, the slot, the chosen expert(s) and every expert's gate probability.
    `fig.data[0].z` has shape (routed slots, tokens)."""
    slots = list(trace.get("slots") or [])
    if not slots:
        return _empty(
            "No routed slots: every slot holds one block, so there are no router decisions to show.", title
        )
    tokens = [str(t) for t in (trace.get("tokens") or [])]
    n_tokens = len(tokens) or max(len(s.get("probs") or s.get("chosen") or []) for s in slots)
    if n_tokens == 0:
        return _empty("No tokens in this trace yet.", title)
    if not tokens:
        tokens = [str(i) for i in (trace.get("token_ids") or range(n_tokens))][:n_tokens]
    tokens += [""] * (n_tokens - len(tokens))

    experts = list(dict.fromkeys(e for s in slots for e in s.get("experts") or []))
    code = {e: i for i, e in enumerate(experts)}
    palette = expert_colors(experts, colors)
    hover_tokens = [visible_token(t, 60) for t in tokens]

    z: list[list[int | None]] = []
    custom: list[list[list[str]]] = []
    for s in slots:
        names = list(s.get("experts") or [])
        probs = list(s.get("probs") or [])
        chosen = list(s.get("chosen") or [])
        # a slot's rows cover the last tokens of the sequence (as in Trace.to_dict): align them to the right
        p_off, c_off = n_tokens - len(probs), n_tokens - len(chosen)
        label = _slot_label(s)
        row_z: list[int | None] = []
        row_c: list[list[str]] = []
        for t in range(n_tokens):
            pick = chosen[t - c_off] if 0 <= t - c_off < len(chosen) else []
            pick = [pick] if isinstance(pick, int) else list(pick)
            top = names[pick[0]] if pick and 0 <= pick[0] < len(names) else None
            row_z.append(code[top] if top is not None else None)
            p_row = probs[t - p_off] if 0 <= t - p_off < len(probs) else []
            lines = [
                f"{'▶ ' if i in pick else ''}{html.escape(n)}: {format_prob(p_row[i] if i < len(p_row) else None)}"
                for i, n in enumerate(names)
            ]
            chosen_text = ", ".join(html.escape(names[i]) for i in pick if 0 <= i < len(names)) or "–"
            row_c.append([hover_tokens[t], label, chosen_text, "<br>".join(lines)])
        z.append(row_z)
        custom.append(row_c)

    n_exp = max(len(experts), 1)
    scale: list[list[Any]] = []
    for i, e in enumerate(experts or ["–"]):
        c = palette.get(e, PALETTE[0])
        scale += [[i / n_exp, c], [(i + 1) / n_exp, c]]

    step = max(1, math.ceil(n_tokens / MAX_TICK_LABELS))
    tickvals = list(range(0, n_tokens, step))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_tokens)),
            y=list(range(len(slots))),
            customdata=custom,
            zmin=-0.5,
            zmax=n_exp - 0.5,
            colorscale=scale,
            xgap=1,
            ygap=1,
            hoverongaps=False,
            hovertemplate=(
                "token %{x}: <b>%{customdata[0]}</b><br>%{customdata[1]} → %{customdata[2]}"
                "<br>%{customdata[3]}<extra></extra>"
            ),
            colorbar={
                "title": {"text": "top-1 expert", "side": "right"},
                "tickmode": "array",
                "tickvals": list(range(len(experts))),
                "ticktext": [html.escape(e) for e in experts],
                "thickness": 14,
                "len": 1.0,
            },
        )
    )
    fig.update_layout(
        title={"text": title},
        font=_FONT,
        template="plotly_white",
        height=max(
            220, 110 + 34 * len(slots), 100 + 18 * len(experts)
        ),  # room for every colour-bar label margin={"l": 80, "r": 20, "t": 50, "b": 70},
        xaxis={
            "title": {"text": "token"},
            "tickmode": "array",
            "tickvals": tickvals,
            "ticktext": [visible_token(tokens[i], max_label_chars) for i in tickvals],
            "tickangle": -45 if n_tokens > 12 else 0,
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={
            "tickmode": "array",
            "tickvals": list(range(len(slots))),
            "ticktext": [_slot_label(s) for s in slots],
            "autorange": "reversed",
            "showgrid": False,
            "zeroline": False,
        },
    )
    return fig


def expert_load(
    trace: Mapping[str, Any],
    colors: Mapping[str, str] | None = None,
    title: str = "Expert load per routed slot",
    max_cols: int = 4,
) -> go.Figure:
    """One small bar chart per routed slot: the fraction of tokens each expert received (top-k choices all
    count, as in `SlotTrace.load`)."""
    slots = list(trace.get("slots") or [])
    if not slots:
        return _empty("No routed slots: nothing to balance.", title)
    experts = list(dict.fromkeys(e for s in slots for e in s.get("experts") or []))
    palette = expert_colors(experts, colors)
    cols = min(len(slots), max_cols)
    rows = math.ceil(len(slots) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        shared_yaxes=True,
        subplot_titles=[_slot_label(s) for s in slots],
        horizontal_spacing=0.04,
        vertical_spacing=min(0.3, 0.5 / rows),
    )
    for k, s in enumerate(slots):
        names = list(s.get("experts") or [])
        load = list(s.get("load") or [])
        if not load:  # older traces: count the chosen experts ourselves
            counts = [0] * len(names)
            for pick in s.get("chosen") or []:
                for i in [pick] if isinstance(pick, int) else pick:
                    if 0 <= i < len(counts):
                        counts[i] += 1
            total = sum(counts) or 1
            load = [c / total for c in counts]
        load = [float(x) for x in load[: len(names)]] + [0.0] * (len(names) - len(load))
        fig.add_trace(
            go.Bar(
                x=[html.escape(n) for n in names],
                y=load,
                marker={"color": [palette[n] for n in names]},
                text=[f"{x:.0%}" for x in load],
                textposition="outside",
                cliponaxis=False,
                showlegend=False,
                name=_slot_label(s),
                hovertemplate=f"{_slot_label(s)}<br>%{{x}}: %{{y:.1%}} of tokens<extra></extra>",
            ),
            row=k // cols + 1,
            col=k % cols + 1,
        )
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", showgrid=True)
    fig.update_yaxes(title={"text": "share of tokens"}, col=1)
    fig.update_layout(
        title={"text": title},
        font=_FONT,
        template="plotly_white",
        bargap=0.25,
        height=max(260, 230 * rows),
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
    )
    return fig


def loss_curve(points: Sequence[Mapping[str, Any]], title: str = "Training loss") -> go.Figure:
    """Loss against step, and the learning rate on a second axis when points carry "lr"."""
    rows = sorted((p for p in points if p.get("step") is not None), key=lambda p: p["step"])
    if not rows:
        return _empty("No training steps yet.", title)

    def finite(v: Any) -> float | None:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if math.isfinite(f) else None  # a diverged step shows as a gap, not a broken axis

    steps = [int(p["step"]) for p in rows]
    losses = [finite(p.get("loss")) for p in rows]
    has_lr = any(p.get("lr") is not None for p in rows)
    fig = make_subplots(specs=[[{"secondary_y": has_lr}]])
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=losses,
            name="loss",
            mode="lines+markers" if len(rows) <= 60 else "lines",
            line={"color": PALETTE[0], "width": 2},
            marker={"size": 5},
            hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>",
        ),
        secondary_y=False,
    )
    if has_lr:
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[finite(p.get("lr")) for p in rows],
                name="learning rate",
                mode="lines",
                line={"color": PALETTE[1], "width": 1.5, "dash": "dot"},
                hovertemplate="step %{x}<br>lr %{y:.3g}<extra></extra>",
            ),
            secondary_y=True,
        )
        fig.update_yaxes(
            title={"text": "learning rate"}, exponentformat="e", showgrid=False, secondary_y=True
        )
    fig.update_yaxes(title={"text": "loss"}, secondary_y=False)
    fig.update_xaxes(title={"text": "step"})
    fig.update_layout(
        title={"text": title},
        font=_FONT,
        template="plotly_white",
        height=320,
        hovermode="x unified",
        margin={"l": 60, "r": 60 if has_lr else 20, "t": 50, "b": 50},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1},
    )
    return fig


__all__ = [
    "PALETTE",
    "alias_of",
    "expert_colors",
    "expert_load",
    "format_prob",
    "loss_curve",
    "model_colors",
    "router_heatmap",
    "visible_token",
]
