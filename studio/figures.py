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


MIXTURE_ROUTERS = ("mixture", "sequence")  # the trace row of a lanes model's output mixture (slot -1)


def is_mixture(slot: Mapping[str, Any]) -> bool:
    """Whether a trace row is a lanes model's output mixture (its experts are the lanes), not a routed slot."""
    return slot.get("router") in MIXTURE_ROUTERS or slot.get("slot") == -1


def _slot_label(slot: Mapping[str, Any]) -> str:
    if is_mixture(slot):
        return "lane mixture" + (" (per sequence)" if slot.get("router") == "sequence" else "")
    label = f"slot {slot.get('slot', '?')}"
    return label + " (pooled)" if slot.get("router") == "pooled" else label


# ---------------------------------------------------------------------------------------------- figures


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


def loss_curve(
    points: Sequence[Mapping[str, Any]], title: str = "Training loss", smoothing: float = 0.0
) -> go.Figure:
    """Loss against step, and the learning rate on a second axis when points carry "lr". With `smoothing` > 0
    (an EMA weight, see `smooth_ema`; 0.8 reads well for a few hundred steps) the raw steps are drawn faint and
    the smoothed curve over them: traces "loss (raw)", "loss (smoothed)", then the learning rate."""
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
    smooth = smoothing > 0 and len(rows) > 1
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=losses,
            name="loss (raw)" if smooth else "loss",
            mode="lines+markers" if len(rows) <= 60 else "lines",
            line={"color": PALETTE[0], "width": 1 if smooth else 2},
            marker={"size": 3 if smooth else 5},
            opacity=0.3 if smooth else 1.0,
            hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>",
        ),
        secondary_y=False,
    )
    if smooth:
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=smooth_ema(losses, smoothing),
                name="loss (smoothed)",
                mode="lines",
                line={"color": PALETTE[0], "width": 2.5},
                connectgaps=True,
                hovertemplate="step %{x}<br>smoothed %{y:.4f}<extra></extra>",
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
            title={"text": "learning rate"},
            exponentformat="e",
            showgrid=False,
            rangemode="tozero",
            secondary_y=True,
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


# ---------------------------------------------------------------------------------------------- routing, readable

ROW_PX = 30  # minimum height of one slot row of the routing heatmap
_TIE_FLOOR = 0.18  # share of an expert's colour in a cell whose gate is a perfect tie (0: white)
_FUSED_COLOR = "#343a40"
_SPACE = "\u2007"  # figure space: unchosen experts line up with the ▶ ones in a hover


def short_name(expert: str, max_chars: int = 12) -> str:
    """A legend-sized expert name: a long alias is cut, the layer kept ("mango-coder-instruct:12" ->
    "mango-co…:12"). Not escaped."""
    if len(expert) <= max_chars:
        return expert
    if ":" in expert:
        alias, layer = expert.rsplit(":", 1)
        keep = max(1, max_chars - len(layer) - 2)
        return f"{alias[:keep]}…:{layer}"
    return expert[: max_chars - 1] + "…"


def gate_intensity(p: float | None, n_experts: int) -> float:
    """How strongly a cell shows its chosen expert's colour, from that expert's gate probability `p`: 0 for
    the least decided gate possible (p = 1/n, e.g. a 0.50/0.50 tie of two experts), 1 for p = 1. A missing
    probability counts as decided."""
    if p is None or not isinstance(p, (int, float)) or not math.isfinite(p):
        return 1.0
    low = 1.0 / max(n_experts, 1)
    if low >= 1.0:
        return 1.0
    return max(0.0, min(1.0, (float(p) - low) / (1.0 - low)))


def shade_by_intensity(color: str, intensity: float, background: str = "#ffffff") -> str:
    """The colour a cell is drawn in: `color` mixed over `background`, `_TIE_FLOOR` of it at intensity 0."""
    a = _TIE_FLOOR + (1.0 - _TIE_FLOOR) * max(0.0, min(1.0, intensity))
    (r, g, b), (br, bg, bb) = _rgb(color), _rgb(background)
    return _hex(br + (r - br) * a, bg + (g - bg) * a, bb + (b - bb) * a)


def routing_cells(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The routing heatmap's data, without plotly: per routed slot (rows) and token position (columns), the
    chosen (top-1) expert, its gate probability and the cell's intensity (`gate_intensity`). Accepts a partial
    trace (tokens so far): a slot's rows are aligned to the right end, as in `Trace.to_dict`, and tokens not
    decoded yet are "".

    Returns {"tokens": [str] * T, "experts": [str] (every expert once, in order of appearance),
    "slots": [mapping], "expert": [[index into experts | None] * T], "prob": [[float | None] * T],
    "intensity": [[float | None] * T], "probs": [[[float | None] per slot expert] * T], "chosen": [[[int]] * T]}."""
    slots = [s for s in (trace.get("slots") or []) if isinstance(s, Mapping)]
    tokens = [str(t) for t in (trace.get("tokens") or [])]
    rows = [max(len(s.get("probs") or []), len(s.get("chosen") or [])) for s in slots]
    n = max([len(tokens), *rows]) if slots else len(tokens)
    if not tokens and n:
        tokens = [str(i) for i in (trace.get("token_ids") or [])][:n]
    tokens += [""] * (n - len(tokens))
    experts = list(dict.fromkeys(str(e) for s in slots for e in s.get("experts") or []))
    code = {e: i for i, e in enumerate(experts)}
    out: dict[str, Any] = {
        "tokens": tokens,
        "experts": experts,
        "slots": slots,
        "expert": [],
        "prob": [],
        "intensity": [],
        "probs": [],
        "chosen": [],
    }
    for s in slots:
        names = [str(e) for e in s.get("experts") or []]
        probs = list(s.get("probs") or [])
        chosen = list(s.get("chosen") or [])
        p_off, c_off = n - len(probs), n - len(chosen)
        r_exp, r_prob, r_int, r_probs, r_chosen = [], [], [], [], []
        for t in range(n):
            pick = chosen[t - c_off] if 0 <= t - c_off < len(chosen) else []
            pick = [pick] if isinstance(pick, int) else [i for i in pick if isinstance(i, int)]
            pick = [i for i in pick if 0 <= i < len(names)]
            p_row = list(probs[t - p_off]) if 0 <= t - p_off < len(probs) else []
            p_row = [_finite(p_row[i]) if i < len(p_row) else None for i in range(len(names))]
            if not pick and any(p is not None for p in p_row):  # probabilities without a decision: the argmax
                pick = [max(range(len(names)), key=lambda i: -1.0 if p_row[i] is None else p_row[i])]
            top = pick[0] if pick else None
            p = p_row[top] if top is not None else None
            r_exp.append(code[names[top]] if top is not None else None)
            r_prob.append(p)
            r_int.append(gate_intensity(p, len(names)) if top is not None else None)
            r_probs.append(p_row)
            r_chosen.append(pick)
        out["expert"].append(r_exp)
        out["prob"].append(r_prob)
        out["intensity"].append(r_int)
        out["probs"].append(r_probs)
        out["chosen"].append(r_chosen)
    return out


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _router_text(slot: Mapping[str, Any]) -> str:
    """ "token, top-2" or "pooled"; top-k read from the width of the first "chosen" row (1 when unknown)."""
    if slot.get("router") == "pooled":
        return "pooled"
    if is_mixture(slot):
        return (
            "one lane per sequence"
            if slot.get("router") == "sequence"
            else "the gate over the lanes, per token"
        )
    first = next(iter(slot.get("chosen") or []), None)
    k = len(first) if isinstance(first, (list, tuple)) and first else 1
    return f"{html.escape(str(slot.get('router') or 'token'))}, top-{k}"


def tick_positions(n: int, max_ticks: int) -> list[int]:
    """At most `max_ticks` evenly spaced positions of 0..n-1, always starting at 0."""
    if n <= 0:
        return []
    step = max(1, math.ceil(n / max(1, max_ticks)))
    return list(range(0, n, step))


def slot_keys(
    slots: Sequence[Mapping[str, Any]], colors: Mapping[str, str] | None = None
) -> tuple[list[tuple[str, str]], list[dict[str, int]]]:
    """Colour keys of routed slots, where a row is one slot: an expert takes its model's colour and is keyed by
    the alias, unless its model has several experts in that slot (then those are keyed by expert name, in shades
    of the model's colour, as `expert_colors`). Shades never stand for a layer across rows, so a pale cell always
    means an undecided gate. Returns the keys [(label, colour)] (unique, in order) and per slot {expert: key}."""
    aliases = [alias_of(str(e)) for s in slots for e in s.get("experts") or []]
    base = dict(model_colors(aliases))
    base.update({a: c for a, c in (colors or {}).items() if a in base})
    keys: list[tuple[str, str]] = []
    key_of: list[dict[str, int]] = []
    for s in slots:
        names = list(dict.fromkeys(str(e) for e in s.get("experts") or []))
        count: dict[str, int] = {}
        for n in names:
            count[alias_of(n)] = count.get(alias_of(n), 0) + 1
        shades = expert_colors([n for n in names if count[alias_of(n)] > 1], base)
        row: dict[str, int] = {}
        for n in names:
            a = alias_of(n)
            key = (a, base[a]) if count[a] == 1 else (n, shades[n])
            if key not in keys:
                keys.append(key)
            row[n] = keys.index(key)
        key_of.append(row)
    return keys, key_of


def routing_heatmap(
    trace: Mapping[str, Any],
    colors: Mapping[str, str] | None = None,
    title: str = "Router decisions per token",
    *,
    max_label_chars: int = 10,
    max_ticks: int = 20,
    row_px: int = ROW_PX,
    expected_tokens: int | None = None,
    legend_chars: int = 12,
) -> go.Figure:
    """Tokens (x: integer positions, token text as thinned tick labels, so repeated tokens stay apart) ×
    routed slots (y, at least `row_px` each). A cell's hue is its chosen (top-1) expert's colour (`slot_keys`:
    the model's colour, shades only where one model has several experts in a slot); its strength is that
    expert's gate probability (`gate_intensity`): a 0.50/0.50 tie is pale, a sure choice full. One heatmap trace
    (z = colour key + intensity, on a colour scale of one pale-to-full band per key) plus one legend-only entry
    per key (horizontal, at the bottom, names cut to `legend_chars`). Hover: the token once, its position, the
    slot and router, every expert's probability once (chosen ones marked ▶).

    Works on a partial trace (call it again as tokens stream); `expected_tokens` fixes the x range for the whole
    run, and `uirevision` keeps the user's zoom across updates. Autosized (no width, small margins) for a
    390 px phone; the height grows with the slots and the legend."""
    cells = routing_cells(trace)
    slots, tokens, experts = cells["slots"], cells["tokens"], cells["experts"]
    if not slots:
        return _empty(
            "No routed slots: every slot holds one block, so there are no router decisions to show.", title
        )
    n_tokens = len(tokens)
    if n_tokens == 0:
        return _empty("No tokens in this trace yet.", title)
    keys, key_of = slot_keys(slots, colors)
    n_keys = max(len(keys), 1)
    # one band per key on [0, n_keys]: from its tie shade at k to its full colour at k + 1
    scale: list[list[Any]] = []
    for k, (_, c) in enumerate(keys or [("–", PALETTE[0])]):
        scale += [[k / n_keys, shade_by_intensity(c, 0.0)], [(k + 1) / n_keys, c]]
    z = [
        [None if e is None else key_of[s][experts[e]] + min(i, 0.999) for e, i in zip(r_e, r_i, strict=True)]
        for s, (r_e, r_i) in enumerate(zip(cells["expert"], cells["intensity"], strict=True))
    ]

    hover_tokens = [visible_token(t, 40) if t else "…" for t in tokens]
    custom: list[list[str]] = []
    for s, slot in enumerate(slots):
        names = [str(e) for e in slot.get("experts") or []]
        head = f"{_slot_label(slot)} · {_router_text(slot)}"
        row = []
        for t in range(n_tokens):
            pick = cells["chosen"][s][t]
            lines = [
                f"{'▶' if i in pick else _SPACE} {html.escape(name)}  {format_prob(p)}"
                for i, (name, p) in enumerate(zip(names, cells["probs"][s][t], strict=True))
            ]
            row.append(f"<b>{hover_tokens[t]}</b>  (position {t})<br>{head}<br>" + "<br>".join(lines))
        custom.append(row)

    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_tokens)),
            y=list(range(len(slots))),
            customdata=custom,
            zmin=0,
            zmax=n_keys,
            colorscale=scale,
            showscale=False,
            xgap=1,
            ygap=2,
            hoverongaps=False,
            hovertemplate="%{customdata}<extra></extra>",
            name="routing",
        )
    )
    for label, color in keys:  # legend entries: the heatmap itself has none
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"symbol": "square", "size": 11, "color": color},
                name=html.escape(short_name(label, legend_chars)),
                hoverinfo="skip",
                showlegend=True,
            )
        )

    ticks = tick_positions(n_tokens, max_ticks)
    shown = [visible_token(tokens[i], max_label_chars) if tokens[i] else "…" for i in ticks]
    angled = n_tokens > 8
    longest = max((len(html.unescape(t)) for t in shown), default=1)
    tick_px = int(6.2 * longest * (0.87 if angled else 0.0)) + 18  # font 10, rotated 60°
    legend, legend_px = _legend_below([short_name(label, legend_chars) for label, _ in keys])
    legend.update(itemclick=False, itemdoubleclick=False)  # the entries are keys, not traces to hide
    plot_px = max(row_px * len(slots), 2 * row_px)
    top = 34
    height = top + plot_px + tick_px + 20 + legend_px + 8
    last = max(n_tokens, expected_tokens or 0)
    fig.update_layout(
        title={"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
        font={**_FONT, "size": 11},
        template="plotly_white",
        autosize=True,
        height=height,
        margin={"l": 4, "r": 6, "t": top, "b": tick_px + 20 + legend_px + 4},
        uirevision="routing",
        legend=legend,
        xaxis={
            "title": {"text": "token position", "standoff": 4, "font": {"size": 11}},
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": shown,
            "tickangle": -60 if angled else 0,
            "tickfont": {"size": 10},
            "range": [-0.5, last - 0.5],
            "showgrid": False,
            "zeroline": False,
            "automargin": False,
        },
        yaxis={
            "tickmode": "array",
            "tickvals": list(range(len(slots))),
            "ticktext": [_slot_label(s) for s in slots],
            "autorange": "reversed",
            "fixedrange": True,
            "showgrid": False,
            "zeroline": False,
            "automargin": True,
            "tickfont": {"size": 11},
        },
    )
    return fig


# ---------------------------------------------------------------------------------------------- evaluation


def _result_rows(results: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    return [r for r in ((results or {}).get("rows") or []) if isinstance(r, Mapping)]


def _domains(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(d) for r in rows for d in (r.get("domains") or {})))


def _row_alias(row: Mapping[str, Any]) -> str:
    name = str(row.get("name") or "")
    return name[: -len(" alone")] if name.endswith(" alone") else name


def _legend_below(names: Sequence[str], narrow_px: int = 330) -> tuple[dict, int]:
    """A horizontal legend at the bottom of the figure with a fixed number of entries a line (as many of the
    longest name as fit in `narrow_px`, a phone's plot width), so its height is known at any width: returns
    the legend layout and its height in pixels."""
    longest = max((len(n) for n in names), default=1)
    per_row = max(1, min(4, int(narrow_px // (34 + 6.6 * longest))))
    rows = math.ceil(len(names) / per_row) if names else 0
    return (
        {
            "orientation": "h",
            "yref": "container",
            "y": 0,
            "yanchor": "bottom",
            "xref": "container",
            "x": 0,
            "xanchor": "left",
            "entrywidth": 1.0 / per_row - 0.01,
            "entrywidthmode": "fraction",
            "font": {"size": 11},
        },
        22 * rows + 8,
    )


def perplexity_bars(
    results: Mapping[str, Any] | None,
    colors: Mapping[str, str] | None = None,
    title: str = "Perplexity per domain (lower is better)",
    legend_chars: int = 18,
) -> go.Figure:
    """Grouped bars of perplexity on a log y axis, one group per domain: the fused model (dark), its oracle if
    there is one (hatched) and every source alone (in its model's colour) side by side. `results` is what the
    Evaluate tab stores (`mol.evaluation.EvalReport.to_dict()`, `EvaluationInfo.results`):
    {"rows": [{"name", "kind": "fused"|"oracle"|"source", "domains": {domain: {"perplexity", ...}}}]}.
    Pass the studio's `model_colors` as `colors=` (a source row "bard alone" takes the colour of "bard")."""
    rows = _result_rows(results)
    domains = _domains(rows)
    if not rows or not domains:
        return _empty("No evaluation results yet.", title)
    sources = [_row_alias(r) for r in rows if r.get("kind") == "source"]
    palette = dict(model_colors(sources))
    palette.update({a: c for a, c in (colors or {}).items() if a in palette})
    x = list(range(len(domains)))
    domain_text = [html.escape(d) for d in domains]
    fig = go.Figure()
    for r in rows:
        kind = str(r.get("kind") or "")
        values = []
        for d in domains:
            p = _finite(((r.get("domains") or {}).get(d) or {}).get("perplexity"))
            values.append(p if p is not None and p > 0 else None)  # log axis: no zero, no NaN
        if kind == "oracle":
            marker: dict[str, Any] = {
                "color": "#ffffff",
                "line": {"color": _FUSED_COLOR, "width": 1.5},
                "pattern": {"shape": "/", "fgcolor": _FUSED_COLOR, "size": 6},
            }
        elif kind == "source":
            marker = {"color": palette.get(_row_alias(r), PALETTE[0])}
        else:
            marker = {"color": _FUSED_COLOR}
        name = html.escape(short_name(str(r.get("name") or kind), legend_chars))
        if kind in ("fused", "oracle") and not name.endswith(kind):
            name += f" ({kind})"
        fig.add_trace(
            go.Bar(
                x=x,
                y=values,
                name=name,
                marker=marker,
                text=[f"{v:.1f}" if v is not None else "" for v in values],
                textposition="outside",
                cliponaxis=False,
                textfont={"size": 10},
                customdata=domain_text,
                hovertemplate=f"{name}<br>%{{customdata}}: perplexity %{{y:.2f}}<extra></extra>",
            )
        )
    finite = [v for t in fig.data for v in t.y if v is not None]
    legend, legend_px = _legend_below([html.unescape(t.name) for t in fig.data])
    if finite:  # room above the tallest bar for its label, on the log scale
        lo, hi = math.log10(min(finite)), math.log10(max(finite))
        yrange = [min(lo - 0.15, math.floor(lo * 4) / 4), hi + max(0.15, 0.12 * (hi - lo))]
    else:
        yrange = None
    fig.update_layout(
        title={"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
        font={**_FONT, "size": 11},
        template="plotly_white",
        autosize=True,
        barmode="group",
        bargap=0.2,
        bargroupgap=0.05,
        height=260 + legend_px + 40,
        margin={"l": 4, "r": 6, "t": 34, "b": legend_px + 40},
        legend=legend,
        xaxis={
            "tickmode": "array",
            "tickvals": x,
            "ticktext": [html.escape(short_name(d, 16)) for d in domains],
            "automargin": True,
        },
        yaxis={
            "type": "log",
            "dtick": "D2",  # 1, 2, 5 per decade: readable on a phone
            "title": {"text": "perplexity (log)", "standoff": 4},
            "range": yrange,
            "automargin": True,
        },
    )
    return fig


def _slot_sort_key(slot: str) -> tuple[int, str]:
    return (int(slot), slot) if slot.lstrip("-").isdigit() else (1 << 30, slot)


def routing_results(
    results: Mapping[str, Any] | None,
    colors: Mapping[str, str] | None = None,
    title: str = "Expert load and label agreement per slot",
    row: str | None = None,
    max_cols: int = 2,
    legend_chars: int = 12,
) -> go.Figure:
    """Small multiples, one panel per routed slot: per domain (x), the share of tokens each expert received
    (stacked bars, expert colours) and the router's agreement with the domain labels (black diamond, when the
    evaluation had labels). Reads the row named `row` of the Evaluate tab's results (default: the fused one):
    {"rows": [{"name", "kind", "domains": {domain: {"agreement": {slot: share}, "load": {slot: {expert: share}}}}}]}."""
    rows = _result_rows(results)
    chosen = next((r for r in rows if r.get("name") == row), None) if row is not None else None
    chosen = chosen or next((r for r in rows if r.get("kind") == "fused"), None)
    per_domain = dict((chosen or {}).get("domains") or {})
    domains = list(per_domain)
    slots = sorted(
        dict.fromkeys(str(k) for d in per_domain.values() for k in ((d or {}).get("load") or {})),
        key=_slot_sort_key,
    )
    if not slots or not domains:
        return _empty("No routed slots in this evaluation: nothing to show per slot.", title)
    slot_experts = {
        slot: list(
            dict.fromkeys(
                str(e) for d in per_domain.values() for e in (((d or {}).get("load") or {}).get(slot) or {})
            )
        )
        for slot in slots
    }
    keys, key_of = slot_keys([{"experts": slot_experts[slot]} for slot in slots], colors)
    cols = max(1, min(len(slots), max_cols))
    n_rows = math.ceil(len(slots) / cols)
    panel_px = 170
    fig = make_subplots(
        rows=n_rows,
        cols=cols,
        shared_yaxes=True,
        subplot_titles=[f"slot {html.escape(s)}" for s in slots],
        horizontal_spacing=0.06,
        vertical_spacing=min(0.25, 60 / (panel_px * n_rows + 60 * (n_rows - 1))) if n_rows > 1 else 0.1,
    )
    x = list(range(len(domains)))
    seen: dict[str, None] = {}  # legend labels shown, in order
    any_agreement = False
    for k, slot in enumerate(slots):
        r, c = k // cols + 1, k % cols + 1
        for e in slot_experts[slot]:
            label, color = keys[key_of[k][e]]
            shares = [
                _finite((((per_domain[d] or {}).get("load") or {}).get(slot) or {}).get(e)) for d in domains
            ]
            fig.add_trace(
                go.Bar(
                    x=x,
                    y=shares,
                    name=html.escape(short_name(label, legend_chars)),
                    legendgroup=label,
                    showlegend=label not in seen,
                    marker={"color": color},
                    customdata=[html.escape(d) for d in domains],
                    hovertemplate=(
                        f"slot {html.escape(slot)} · {html.escape(e)}<br>%{{customdata}}: "
                        "%{y:.0%} of tokens<extra></extra>"
                    ),
                ),
                row=r,
                col=c,
            )
            seen[label] = None
        agreement = [_finite(((per_domain[d] or {}).get("agreement") or {}).get(slot)) for d in domains]
        if any(a is not None for a in agreement):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=agreement,
                    mode="markers+text",
                    name="agreement with labels",
                    legendgroup="agreement",
                    showlegend=not any_agreement,
                    marker={
                        "symbol": "diamond",
                        "size": 10,
                        "color": "#000000",
                        "line": {"color": "#fff", "width": 1},
                    },
                    text=[f"{a:.0%}" if a is not None else "" for a in agreement],
                    textposition="top center",
                    textfont={"size": 10},
                    cliponaxis=False,
                    customdata=[html.escape(d) for d in domains],
                    hovertemplate=(
                        f"slot {html.escape(slot)}<br>%{{customdata}}: router agrees with the label on "
                        "%{y:.0%} of labelled tokens<extra></extra>"
                    ),
                ),
                row=r,
                col=c,
            )
            any_agreement = True
    ticktext = [html.escape(short_name(d, 10)) for d in domains]
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=ticktext, tickfont={"size": 10})
    fig.update_yaxes(range=[0, 1.15], tickformat=".0%", tickvals=[0, 0.5, 1], fixedrange=True)
    legend, legend_px = _legend_below(
        [short_name(label, legend_chars) for label in seen]
        + (["agreement with labels"] if any_agreement else [])
    )
    fig.update_layout(
        title={"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
        font={**_FONT, "size": 11},
        template="plotly_white",
        autosize=True,
        barmode="stack",
        bargap=0.3,
        height=50 + panel_px * n_rows + 60 * (n_rows - 1) + 30 + legend_px,
        margin={"l": 4, "r": 6, "t": 60, "b": 30 + legend_px},
        legend=legend,
    )
    fig.update_annotations(font={"size": 11})
    return fig


# ---------------------------------------------------------------------------------------------- smoothing


def smooth_ema(values: Sequence[float | None], weight: float = 0.8) -> list[float | None]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider): `weight` 0 is the raw
    curve, near 1 very smooth. Missing or non-finite values stay gaps and do not move the average."""
    weight = max(0.0, min(float(weight), 0.999))
    out: list[float | None] = []
    avg, norm = 0.0, 0.0
    for v in values:
        f = _finite(v)
        if f is None:
            out.append(None)
            continue
        avg = weight * avg + (1 - weight) * f
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


__all__ = [
    "PALETTE",
    "ROW_PX",
    "alias_of",
    "expert_colors",
    "expert_load",
    "format_prob",
    "gate_intensity",
    "is_mixture",
    "loss_curve",
    "model_colors",
    "perplexity_bars",
    "routing_cells",
    "routing_heatmap",
    "routing_results",
    "shade_by_intensity",
    "slot_keys",
    "short_name",
    "smooth_ema",
    "tick_positions",
    "visible_token",
]
