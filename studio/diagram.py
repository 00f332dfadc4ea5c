"""The fused model drawn as a self-contained SVG string: the data flow from top to bottom (the base's embeddings,
one row per slot with its expert blocks coloured by source model, widths, adapter markers and the router of a
routed slot, then the base's final norm and head) and a legend of the sources. No script, no external
reference, no CDN: the string can go straight into a `gr.HTML`.

    svg = recipe_svg(recipe)                                  # from the recipe alone
    svg = recipe_svg(plan.recipe, **plan_info(plan))          # with widths, adapters and families from a plan

Every user string (recipe name, aliases, expert names) is escaped; colours that are not plain hex are ignored.

Layout: `_read_recipe` turns the input into a small view (`_Model`); each part of the picture is one function
that draws into a `_Canvas` at its y cursor inside a `_Lane` (an x range). A lanes recipe (several sources side by
side, DESIGN.md) gets one `_Lane` per stream, each a `_Model` of its own drawn by the same row functions with its
own y cursor; then its stitches (dashed links from one lane's slot into another's) and the output mixture below
the lanes' heads."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html import escape
from typing import Any

from studio.draft_recipe import mixture_label
from studio.figures import model_colors

WIDTH = 420  # viewBox width: the SVG scales to its container (width 100%), readable down to ~360 px
PAD = 10
LABEL_W = 50  # the slot-label column on the left
EXPERT_H = 38
ROUTER_H = 18
GAP = 6
ARROW = 14  # vertical room between rows, holding the flow arrow
PER_LINE = 3  # expert blocks side by side in one slot row before wrapping
CHAR_PX = 6.4  # average width of one character of the 11 px font, for fitting labels
FONT = "Inter, ui-sans-serif, system-ui, sans-serif"
INK = "#212529"
MUTED = "#6c757d"
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
_EXPERT = re.compile(r"^\s*([^:\s]+)\s*:\s*(-?\d+)\s*$")
_RANGE = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*-\s*(\d+)\s*$")


# ---------------------------------------------------------------------------------------------- the view


@dataclass
class _Expert:
    name: str  # "alias:layer"
    alias: str
    layer: int | None
    width: int | None
    adapter: str | None  # None: runs in the base stream as is
    positions: bool = False  # adds its own position embedding on entry


@dataclass
class _Slot:
    index: int
    experts: list[_Expert]
    router: str | None  # "token" | "pooled" | None (one expert)
    top_k: int = 1


@dataclass
class _Model:
    name: str
    base: str
    adapter_type: str
    aliases: list[str]
    widths: dict[str, int]
    families: dict[str, str]
    colors: dict[str, str]
    slots: list[_Slot] = field(default_factory=list)

    @property
    def base_width(self) -> int | None:
        return self.widths.get(self.base)


def plan_info(plan: Any) -> dict[str, Any]:
    """The keyword arguments of `recipe_svg` read from a `mol.planning.Plan` (duck-typed): widths and families per
    source, the adapter of every expert (by slot, as the plan decided it), which experts add positions."""
    lanes = getattr(plan, "lanes", None) or {}
    if lanes:  # each lane planned as a recipe of its own: its facts per lane, the sources' merged
        per_lane = {name: plan_info(p) for name, p in lanes.items()}
        widths = {a: w for info in per_lane.values() for a, w in info["widths"].items()}
        families = {a: f for info in per_lane.values() for a, f in info["families"].items()}
        for name, p in lanes.items():
            per_lane[name]["layers"] = len(p.slots)
        return {"widths": widths, "families": families, "lanes": per_lane}
    widths = {a: int(s.width) for a, s in plan.sources.items()}
    families = {
        a: str(getattr(getattr(s, "family", None), "name", "") or "") for a, s in plan.sources.items()
    }
    adapters: dict[tuple[int, str], str | None] = {}
    positions: set[tuple[int, str]] = set()
    for s in plan.slots:
        for e in s.experts:
            adapters[(s.index, e.name)] = e.adapter
            if getattr(e, "add_positions", False):
                positions.add((s.index, e.name))
    return {"widths": widths, "families": families, "adapters": adapters, "positions": positions}


def _as_dict(recipe: Any) -> dict:
    if hasattr(recipe, "to_dict") and not isinstance(recipe, Mapping):
        return recipe.to_dict()
    return dict(recipe or {})


def _experts_of(raw: Any) -> tuple[list[tuple[str, int | None]], dict | None]:
    """A slot as written (canonical, board draft, or a shorthand) -> [(alias, layer)], router mapping."""
    router = None
    if isinstance(raw, Mapping):
        router = raw.get("router")
        raw = raw.get("experts") or []
    items = [raw] if isinstance(raw, (str, Mapping)) else list(raw or [])
    out: list[tuple[str, int | None]] = []
    for item in items:
        if isinstance(item, Mapping) and "model" in item:
            layer = item.get("layer")
            out.append((str(item["model"]), layer if isinstance(layer, int) else None))
            continue
        text = str(item)
        m = _EXPERT.match(text)
        if m:
            out.append((m.group(1), int(m.group(2))))
        else:
            out.append((text.rsplit(":", 1)[0] if ":" in text else text, None))
    return out, (
        router if isinstance(router, Mapping) else {"type": router} if isinstance(router, str) else None
    )


def _slots_of(raw_slots: Any) -> list[tuple[list[tuple[str, int | None]], dict | None]]:
    out = []
    for raw in raw_slots or []:
        m = _RANGE.match(raw) if isinstance(raw, str) else None
        if m and int(m.group(3)) - int(m.group(2)) < 256:  # "bard:0-3": several plain slots
            out += [([(m.group(1), i)], None) for i in range(int(m.group(2)), int(m.group(3)) + 1)]
        else:
            out.append(_experts_of(raw))
    return out


def _read_recipe(
    recipe: Any,
    widths: Mapping[str, int] | None,
    adapters: Mapping[Any, str | None] | None,
    families: Mapping[str, str] | None,
    positions: Iterable[Any] | None,
    colors: Mapping[str, str] | None,
) -> _Model:
    data = _as_dict(recipe)
    models = data.get("models") or {}
    slots = _slots_of(data.get("slots"))
    base = str(data.get("base") or next(iter(models), ""))
    aliases = list(dict.fromkeys([*(str(a) for a in models), base, *(a for ex, _ in slots for a, _ in ex)]))
    aliases = [a for a in aliases if a]
    palette = dict(model_colors(aliases))
    palette.update({a: c for a, c in (colors or {}).items() if a in palette and _HEX.match(str(c))})
    adapter = data.get("adapter") or {}
    adapter_type = str((adapter.get("type") if isinstance(adapter, Mapping) else adapter) or "linear")
    w = {str(a): int(v) for a, v in (widths or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    model = _Model(
        name=str(data.get("name") or "recipe"),
        base=base,
        adapter_type=adapter_type,
        aliases=aliases,
        widths=w,
        families={str(a): str(f) for a, f in (families or {}).items() if f},
        colors=palette,
    )
    adds = set(positions or ())
    for i, (experts, router) in enumerate(slots):
        views = []
        for alias, layer in experts:
            name = f"{alias}:{layer}" if layer is not None else alias
            if adapters is not None and ((i, name) in adapters or name in adapters):
                kind = adapters[(i, name)] if (i, name) in adapters else adapters[name]
            else:  # as mol.plan decides: every foreign block enters the base stream through an adapter
                kind = adapter_type if alias != base else None
            views.append(_Expert(name, alias, layer, w.get(alias), kind, (i, name) in adds or name in adds))
        kind = None
        top_k = 1
        if len(views) > 1:
            kind = "pooled" if (router or {}).get("type") == "pooled" else "token"
            k = (router or {}).get("top_k")
            top_k = 1 if kind == "pooled" or not isinstance(k, int) else max(1, min(k, len(views)))
        model.slots.append(_Slot(i, views, kind, top_k))
    return model


# ---------------------------------------------------------------------------------------------- drawing


@dataclass
class _Lane:
    """The x range one stream is drawn in."""

    x: float
    width: float


@dataclass
class _Canvas:
    parts: list[str] = field(default_factory=list)
    y: float = PAD

    def add(self, svg: str) -> None:
        self.parts.append(svg)


def _attr(value: Any) -> str:
    return escape(str(value), quote=True)


def _fit(text: str, px: float) -> str:
    n = max(1, int(px / CHAR_PX))
    return text if len(text) <= n else text[: max(1, n - 1)] + "…"


def _ink_on(color: str) -> str:
    """Black or white text, whichever reads better on `color`."""
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return INK if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.55 else "#ffffff"


def _tint(color: str, amount: float = 0.82) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#{:02x}{:02x}{:02x}".format(*(round(c + (255 - c) * amount) for c in (r, g, b)))


def _text(x: float, y: float, text: str, size: int = 11, fill: str = INK, anchor: str = "start", **kw) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_attr(v)}"' for k, v in kw.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" text-anchor="{anchor}"{extra}>'
        f"{escape(text, quote=False)}</text>"
    )


def _arrow(c: _Canvas, x: float) -> None:
    """The flow arrow from the row above to the next one."""
    y0, y1 = c.y, c.y + ARROW
    c.add(
        f'<g class="flow"><line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1 - 4:.1f}" stroke="{MUTED}" '
        f'stroke-width="1.5"/><polygon points="{x - 4:.1f},{y1 - 5:.1f} {x + 4:.1f},{y1 - 5:.1f} {x:.1f},'
        f'{y1:.1f}" fill="{MUTED}"/></g>'
    )
    c.y = y1


def _title(c: _Canvas, m: _Model) -> None:
    c.add(
        _text(PAD, c.y + 13, _fit(m.name, WIDTH - 2 * PAD), size=14, font_weight="600", **{"class": "title"})
    )
    width = f", width {m.base_width}" if m.base_width else ""
    routed = sum(1 for s in m.slots if s.router)
    c.add(
        _text(
            PAD,
            c.y + 29,
            _fit(f"{len(m.slots)} slots, {routed} routed · base {m.base}{width}", WIDTH - 2 * PAD),
            size=11,
            fill=MUTED,
        )
    )
    c.y += 38


def _base_box(c: _Canvas, m: _Model, lane: _Lane, kind: str, label: str) -> None:
    """A full-width box of the base model: its embeddings at the top, its final norm + head at the bottom."""
    color = m.colors.get(m.base, "#868e96")
    h = 26
    width = f" · d={m.base_width}" if m.base_width else ""
    c.add(
        f'<g class="{kind}" data-model="{_attr(m.base)}"><title>{escape(label)} of {escape(m.base)}</title>'
        f'<rect x="{lane.x:.1f}" y="{c.y:.1f}" width="{lane.width:.1f}" height="{h}" rx="5" '
        f'fill="{_tint(color)}" stroke="{color}" stroke-width="1.5"/>'
        + _text(
            lane.x + lane.width / 2,
            c.y + 17,
            _fit(f"{label} · {m.base}{width}", lane.width - 8),
            anchor="middle",
        )
        + "</g>"
    )
    c.y += h


def _router_bar(c: _Canvas, s: _Slot, lane: _Lane) -> None:
    text = (
        "router: pooled (one expert per sequence)"
        if s.router == "pooled"
        else f"router: token · top-{s.top_k}"
    )
    c.add(
        f'<g class="router" data-router="{_attr(s.router)}" data-top-k="{s.top_k}">'
        f'<rect x="{lane.x:.1f}" y="{c.y:.1f}" width="{lane.width:.1f}" height="{ROUTER_H}" rx="9" '
        f'fill="#f1f3f5" stroke="{MUTED}" stroke-dasharray="3 2"/>'
        + _text(
            lane.x + lane.width / 2, c.y + 13, _fit(text, lane.width - 8), size=10, fill=INK, anchor="middle"
        )
        + "</g>"
    )
    c.y += ROUTER_H + 4


def _resizes(e: _Expert, base_width: int | None) -> bool:
    return e.width is not None and base_width is not None and e.width != base_width


def _adapter_badge(e: _Expert, base_width: int | None, x: float, y: float) -> str:
    """A ⇄ marker in an expert's top-right corner where it enters the base stream through an adapter; red
    where the widths differ."""
    if not e.adapter:
        return ""
    resize = _resizes(e, base_width)
    tip = f"{e.adapter} adapter" + (f": width {e.width} ↔ {base_width}" if resize else " (same width)")
    ink = "#c92a2a" if resize else INK
    return (
        f'<g class="adapter" data-adapter="{_attr(e.adapter)}" data-resize="{str(resize).lower()}">'
        f"<title>{escape(tip)}</title>"
        f'<rect x="{x - 22:.1f}" y="{y:.1f}" width="22" height="14" rx="7" fill="#ffffff" '
        f'stroke="{ink}" stroke-width="1.2"/>'
        + _text(x - 11, y + 10.5, "⇄", size=10, fill=ink, anchor="middle")
        + "</g>"
    )


def _expert_box(m: _Model, s: _Slot, e: _Expert, x: float, y: float, w: float) -> str:
    color = m.colors.get(e.alias, "#868e96")
    ink = _ink_on(color)
    width = ""
    if e.width:
        width = f"d={e.width} → {m.base_width}" if e.adapter and _resizes(e, m.base_width) else f"d={e.width}"
    detail = " · ".join(p for p in (width, "+pos" if e.positions else "") if p)
    tip = f"{e.name} (slot {s.index})" + (f", width {e.width}" if e.width else "")
    if e.positions:
        tip += ", adds its own position embedding"
    name_px = w - 12 - (24 if e.adapter else 0)
    return (
        f'<g class="expert" data-expert="{_attr(e.name)}" data-model="{_attr(e.alias)}" data-slot="{s.index}">'
        f"<title>{escape(tip)}</title>"
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{EXPERT_H}" rx="5" fill="{color}"/>'
        + _text(x + 7, y + 16, _fit(e.name, name_px), size=11, fill=ink, font_weight="600")
        + (_text(x + 7, y + 30, _fit(detail, w - 12), size=10, fill=ink) if detail else "")
        + _adapter_badge(e, m.base_width, x + w - 4, y + 4)
        + "</g>"
    )


def _slot_row(c: _Canvas, m: _Model, s: _Slot, lane: _Lane, label: bool = True) -> None:
    """One slot: its label, the router bar when routed, then its expert blocks (wrapping after PER_LINE), joined
    below by a mixing dot when several run."""
    top = c.y
    c.add(f'<g class="slot" data-slot="{s.index}">')
    if s.router:
        _router_bar(c, s, lane)
    n = len(s.experts)
    per = max(1, min(n, PER_LINE))
    bw = (lane.width - GAP * (per - 1)) / per
    for k, e in enumerate(s.experts):
        row, col = divmod(k, per)
        x = lane.x + col * (bw + GAP)
        y = c.y + row * (EXPERT_H + GAP)
        c.add(_expert_box(m, s, e, x, y, bw))
    lines = -(-n // per)
    c.y += lines * EXPERT_H + (lines - 1) * GAP
    if n > 1:  # the router mixes the chosen experts' updates
        cx = lane.x + lane.width / 2
        c.add(
            f'<g class="mix"><circle cx="{cx:.1f}" cy="{c.y + 8:.1f}" r="6" fill="#ffffff" stroke="{MUTED}"/>'
            + _text(cx, c.y + 11.5, "+", size=11, fill=INK, anchor="middle")
            + "</g>"
        )
        c.y += 14
    if label:
        c.add(
            _text(PAD, (top + c.y) / 2 + 4, f"slot {s.index}", size=11, fill=MUTED, **{"class": "slot-label"})
        )
    c.add("</g>")


def _legend(c: _Canvas, m: _Model) -> None:
    """Sources (swatch, alias, width, family, base marked), then the keys of the markers used."""
    c.y += 10
    c.add('<g class="legend">')
    col_w = (WIDTH - 2 * PAD) / 2
    for k, alias in enumerate(m.aliases):
        x = PAD + (k % 2) * col_w
        y = c.y + (k // 2) * 18
        bits = [alias + (" (base)" if alias == m.base else "")]
        if alias in m.widths:
            bits.append(f"d={m.widths[alias]}")
        if m.families.get(alias):
            bits.append(m.families[alias])
        c.add(
            f'<g class="source" data-model="{_attr(alias)}"><rect x="{x:.1f}" y="{y:.1f}" width="12" height="12" '
            f'rx="2" fill="{m.colors[alias]}"/>'
            + _text(x + 17, y + 10, _fit(" · ".join(bits), col_w - 22))
            + "</g>"
        )
    c.y += 18 * -(-len(m.aliases) // 2)
    keys = []
    if any(e.adapter for s in m.slots for e in s.experts):
        keys.append(f"⇄ {m.adapter_type} adapter into the base stream; red: widths differ")
    if any(s.router for s in m.slots):
        keys.append("+ the router mixes its top-k experts' updates")
    for key in keys:
        c.add(_text(PAD, c.y + 11, _fit(key, WIDTH - 2 * PAD), size=10, fill=MUTED))
        c.y += 15
    c.add("</g>")


def recipe_svg(
    recipe: Any,
    *,
    widths: Mapping[str, int] | None = None,
    adapters: Mapping[Any, str | None] | None = None,
    families: Mapping[str, str] | None = None,
    positions: Iterable[Any] | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    layers: Mapping[str, int] | None = None,
    lanes: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The recipe's data flow as one `<svg>` string, width 100% of its container (viewBox `WIDTH` wide, as tall
    as the recipe needs).

    `recipe`: a `mol.recipe.Recipe`, its `to_dict()`, or a studio board draft ({"name", "base", "models", "slots":
    [{"experts": ["alias:layer"], "router": {...} | None}]}; shorthand slots accepted). Optional plan facts:
    `widths` {alias: hidden size}, `adapters` {(slot index, expert name) or expert name: adapter type or None}
    (default: as the plan decides, every block of a non-base model gets the recipe's adapter), `families`
    {alias: family}, `positions` (experts that add their own position embedding), `colors` {alias: "#rrggbb"}
    (default: `studio.figures.model_colors` over the recipe's aliases). `plan_info(plan)` gives all but colours.

    A lanes recipe ({"lanes": {name: {"base", "slots"?}}, "stitches", "mixture"}, or a board draft of one) is
    drawn as its lanes side by side, each with its own embeddings, slots and head (a lane without slots: its base's
    `layers` {alias: count} in order, else one box for them), its stitches and the output mixture. `lanes`
    {lane: {"adapters", "positions", "layers"}} gives per-lane plan facts (`plan_info` of a lanes plan has it).

    Elements carry classes for tests and styling: `.expert` (one per expert of every slot, data-expert,
    data-model, data-slot), `.adapter`, `.router`, `.slot`, `.embeddings`, `.head`, `.legend .source`; for lanes
    also `.lane` (data-lane, data-model: its base), `.stitch` (data-from, data-to, data-after) and `.mixture`
    (data-mixture: token or sequence)."""
    data = _as_dict(recipe)
    if data.get("lanes"):
        return _lanes_svg(data, widths, families, colors, title, layers or {}, lanes or {})
    m = _read_recipe(recipe, widths, adapters, families, positions, colors)
    if title is not None:
        m.name = title
    c = _Canvas()
    lane = _Lane(PAD + LABEL_W, WIDTH - 2 * PAD - LABEL_W)
    _title(c, m)
    _base_box(c, m, lane, "embeddings", "embeddings")
    for s in m.slots:
        _arrow(c, lane.x + lane.width / 2)
        _slot_row(c, m, s, lane)
    _arrow(c, lane.x + lane.width / 2)
    _base_box(c, m, lane, "head", "final norm + head")
    _legend(c, m)
    height = c.y + PAD
    label = f"Model diagram of {m.name}"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="mol-diagram" role="img" aria-label="{_attr(label)}" '
        f'viewBox="0 0 {WIDTH} {height:.0f}" width="100%" style="max-width:{WIDTH * 1.6:.0f}px;height:auto" '
        f'font-family="{_attr(FONT)}"><title>{escape(label)}</title>' + "".join(c.parts) + "</svg>"
    )


# ---------------------------------------------------------------------------------------------- lanes

LANE_GAP = 10
LANE_MIN_W = 120  # a lane column's least width; wider recipes widen the viewBox
MIXTURE_H = 30


def _lane_slots(lane: Mapping[str, Any], base: str, layers: int | None) -> list[Any] | None:
    """A lane's slots as written, or its base's layers in order (None: their number is unknown)."""
    if lane.get("slots") is not None:
        return list(lane.get("slots") or [])
    return None if layers is None else [f"{base}:{i}" for i in range(layers)]


def _stitch_view(raw: Any) -> dict | None:
    if not isinstance(raw, Mapping):
        return None
    after = raw.get("after")
    ok = isinstance(after, list | tuple) and len(after) == 2 and all(isinstance(a, int) for a in after)
    return {
        "from": str(raw.get("from") or ""),
        "to": str(raw.get("to") or ""),
        "after": tuple(after) if ok else None,
        "type": str(raw.get("type") or "linear"),
        "rank": raw.get("rank"),
    }


def _lanes_svg(
    data: dict,
    widths: Mapping[str, int] | None,
    families: Mapping[str, str] | None,
    colors: Mapping[str, str] | None,
    title: str | None,
    layers: Mapping[str, int],
    facts: Mapping[str, Mapping[str, Any]],
) -> str:
    raw_lanes = data.get("lanes") or {}
    if isinstance(raw_lanes, list):  # a board draft's list form
        raw_lanes = {str(ln.get("name")): ln for ln in raw_lanes if isinstance(ln, Mapping)}
    raw_lanes = {str(n): (ln if isinstance(ln, Mapping) else {"base": ln}) for n, ln in raw_lanes.items()}
    models = data.get("models") or {}
    all_aliases = [str(a) for a in models] + [str(ln.get("base") or "") for ln in raw_lanes.values()]
    palette = dict(model_colors([a for a in dict.fromkeys(all_aliases) if a]))
    palette.update({a: c for a, c in (colors or {}).items() if a in palette and _HEX.match(str(c))})
    views: list[tuple[str, _Model, bool]] = []  # lane name, its model, whether its slots are known
    for name, ln in raw_lanes.items():
        base = str(ln.get("base") or "")
        info = facts.get(name) or {}
        n_layers = info.get("layers") if isinstance(info.get("layers"), int) else layers.get(base)
        slots = _lane_slots(ln, base, n_layers if isinstance(n_layers, int) else None)
        sub = {
            "name": name,
            "base": base,
            "models": models,
            "adapter": data.get("adapter"),
            "slots": slots or [],
        }
        m = _read_recipe(sub, widths, info.get("adapters"), families, info.get("positions"), palette)
        m.colors = {**palette, **m.colors}
        views.append((name, m, slots is not None))
    mixture = data.get("mixture") or {}
    mix_type = str((mixture.get("type") if isinstance(mixture, Mapping) else mixture) or "token")
    stitches = [v for v in (_stitch_view(s) for s in data.get("stitches") or []) if v is not None]

    n = max(len(views), 1)
    width = max(WIDTH, 2 * PAD + n * LANE_MIN_W + (n - 1) * LANE_GAP)
    lane_w = (width - 2 * PAD - (n - 1) * LANE_GAP) / n
    name = title if title is not None else str(data.get("name") or "recipe")
    c = _Canvas()
    c.add(_text(PAD, c.y + 13, _fit(name, width - 2 * PAD), size=14, font_weight="600", **{"class": "title"}))
    sub_title = (
        f"{len(views)} lanes side by side · {len(stitches)} stitch{'es' if len(stitches) != 1 else ''} · "
        f"output mixture: {mixture_label(mix_type)}"
    )
    c.add(_text(PAD, c.y + 29, _fit(sub_title, width - 2 * PAD), size=11, fill=MUTED))
    top = c.y + 38
    bottoms: dict[tuple[str, int], float] = {}  # (lane, slot) -> y below that slot's row
    ends: list[tuple[float, float]] = []  # each lane's head: (x centre, y bottom)
    for k, (lane_name, m, known) in enumerate(views):
        lane = _Lane(PAD + k * (lane_w + LANE_GAP), lane_w)
        c.y = top
        color = m.colors.get(m.base, "#868e96")
        c.add(f'<g class="lane" data-lane="{_attr(lane_name)}" data-model="{_attr(m.base)}">')
        c.add(
            _text(
                lane.x + lane.width / 2,
                c.y + 12,
                _fit(f"lane {lane_name}", lane.width),
                size=12,
                fill=color,
                anchor="middle",
                font_weight="600",
                **{"class": "lane-title"},
            )
        )
        c.y += 18
        _base_box(c, m, lane, "embeddings", "embeddings")
        if not known:
            _arrow(c, lane.x + lane.width / 2)
            c.add(
                f'<g class="slot all-layers"><rect x="{lane.x:.1f}" y="{c.y:.1f}" width="{lane.width:.1f}" '
                f'height="{EXPERT_H}" rx="5" fill="{color}"/>'
                + _text(
                    lane.x + 7,
                    c.y + 23,
                    _fit(f"all layers of {m.base}", lane.width - 12),
                    fill=_ink_on(color),
                )
                + "</g>"
            )
            c.y += EXPERT_H
        for s in m.slots:
            _arrow(c, lane.x + lane.width / 2)
            _slot_row(c, m, s, lane, label=False)
            bottoms[(lane_name, s.index)] = c.y
        _arrow(c, lane.x + lane.width / 2)
        _base_box(c, m, lane, "head", "norm + head")
        ends.append((lane.x + lane.width / 2, c.y))
        c.add("</g>")
    lane_x = {v[0]: PAD + k * (lane_w + LANE_GAP) for k, v in enumerate(views)}
    for st in stitches:
        a = st["after"]
        if a is None or (st["from"], a[0]) not in bottoms or (st["to"], a[1]) not in bottoms:
            continue  # the plan says what is wrong with it; nothing to draw
        y0, y1 = bottoms[(st["from"], a[0])] + 2, bottoms[(st["to"], a[1])] + ARROW / 2
        x0 = lane_x[st["from"]] + (lane_w if lane_x[st["from"]] < lane_x[st["to"]] else 0)
        x1 = lane_x[st["to"]] + (0 if lane_x[st["from"]] < lane_x[st["to"]] else lane_w)
        kind = st["type"] + (f" r={st['rank']}" if st["type"] == "lowrank" and st["rank"] else "")
        tip = f"stitch: lane {st['from']} after slot {a[0]} → lane {st['to']} after slot {a[1]} ({kind})"
        mx = (x0 + x1) / 2
        c.add(
            f'<g class="stitch" data-from="{_attr(st["from"])}" data-to="{_attr(st["to"])}" '
            f'data-after="{a[0]},{a[1]}" data-type="{_attr(st["type"])}"><title>{escape(tip)}</title>'
            f'<path d="M{x0:.1f},{y0:.1f} C{mx:.1f},{y0:.1f} {mx:.1f},{y1:.1f} {x1:.1f},{y1:.1f}" fill="none" '
            f'stroke="#c92a2a" stroke-width="1.6" stroke-dasharray="4 3"/>'
            f'<circle cx="{x1:.1f}" cy="{y1:.1f}" r="3" fill="#c92a2a"/></g>'
        )
    c.y = max((y for _, y in ends), default=c.y)
    mix_top = c.y + ARROW + 4
    for x, y in ends:  # each head's distribution flows into the mixture
        c.add(
            f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{mix_top:.1f}" stroke="{MUTED}" stroke-width="1.5"/>'
        )
    text = f"output mixture · {mixture_label(mix_type)}"
    c.add(
        f'<g class="mixture" data-mixture="{_attr(mix_type)}"><title>{escape(text)} over the lanes: p(x) = Σ g · p_lane(x)'
        f'</title><rect x="{PAD:.1f}" y="{mix_top:.1f}" width="{width - 2 * PAD:.1f}" height="{MIXTURE_H}" rx="8" '
        f'fill="#f1f3f5" stroke="{INK}" stroke-width="1.2"/>'
        + _text(width / 2, mix_top + 19, _fit(text, width - 2 * PAD - 8), anchor="middle", font_weight="600")
        + "</g>"
    )
    c.y = mix_top + MIXTURE_H
    legend = _Model(
        name=name,
        base="",
        adapter_type=views[0][1].adapter_type if views else "linear",
        aliases=[a for a in dict.fromkeys(a for _, m, _ in views for a in m.aliases) if a],
        widths={a: w for _, m, _ in views for a, w in m.widths.items()},
        families={a: f for _, m, _ in views for a, f in m.families.items()},
        colors=palette,
        slots=[s for _, m, _ in views for s in m.slots],
    )
    legend.colors = {**palette, **{a: c2 for _, m, _ in views for a, c2 in m.colors.items()}}
    _legend(c, legend)
    if stitches:
        c.add(
            _text(
                PAD,
                c.y + 11,
                _fit("red dashes: a stitch (gated adapter, zero at start)", width - 2 * PAD),
                size=10,
                fill=MUTED,
            )
        )
        c.y += 15
    height = c.y + PAD
    label = f"Model diagram of {name}"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="mol-diagram lanes" role="img" aria-label="{_attr(label)}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="100%" style="max-width:{width * 1.6:.0f}px;height:auto" '
        f'font-family="{_attr(FONT)}"><title>{escape(label)}</title>' + "".join(c.parts) + "</svg>"
    )


__all__ = ["plan_info", "recipe_svg"]
