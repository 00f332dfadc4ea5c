"""The draft recipe of the recipe board: a recipe as plain JSON (it may be invalid while someone edits it), the edit
operations the board offers, and conversions from recipe YAML (Mango's own, or mergekit passthrough).

The board widget (static/board.js) applies the same operations in the browser for instant feedback; these
Python versions back the API endpoints and the tests. A slot is {"experts": ["alias:layer", ...],
"router": {"type": one of mol's ROUTER_TYPES, "top_k": int} | None}. The recipe rules (router types and
defaults, aliases, adapter types) are mol's (`mol.recipe`); this module only edits drafts."""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

import yaml

import mol.recipe
from mol.errors import RecipeError
from mol.export.mergekit import import_mergekit
from mol.recipe import ALIAS_RE, MAX_ADAPTER_RANK, AdapterSpec, Recipe, RouterSpec, parse_yaml

__all__ = ["ALIAS_RE", "Recipe"]  # re-exported: the rules a draft is checked against are mol's

DEFAULT_ROUTER = {"type": RouterSpec.type, "top_k": RouterSpec.top_k}
_FALLBACK_COLORS = ("#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#c2255c", "#5c940d")


def model_colors(aliases: list[str]) -> dict[str, str]:
    """One colour per model, the same ones the figures use."""
    try:
        from studio.figures import model_colors as figure_colors
    except ImportError:
        return {a: _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)] for i, a in enumerate(aliases)}
    return dict(figure_colors(aliases))


def router_types() -> tuple[str, ...]:
    """mol's router types, read when asked for (mol may register more)."""
    return tuple(mol.recipe.ROUTER_TYPES)


def takes_top_k(router_type: str) -> bool:
    """Whether a router of this type chooses top_k experts per token (mol's RouterSpec writes top_k only then);
    the others run one expert per sequence. An unknown type takes none (mol's recipe check says why)."""
    return router_type in router_types() and "top_k" in RouterSpec(router_type).to_dict()


# ---- slot operations (pure: each returns a new list) -------------------------------------------------


def _normalise(slot: dict) -> dict:
    experts = list(dict.fromkeys(slot.get("experts") or []))  # no duplicates, order kept
    router = slot.get("router")
    if len(experts) < 2:
        router = None
    else:
        router = dict(router or DEFAULT_ROUTER)
        router["type"] = router.get("type") if router.get("type") in router_types() else RouterSpec.type
        top_k = int(router.get("top_k") or RouterSpec.top_k)
        router["top_k"] = max(1, min(top_k, len(experts))) if takes_top_k(router["type"]) else 1
    return {"experts": experts, "router": router}


def _check_index(slots: list[dict], index: int, what: str = "slot") -> int:
    if not isinstance(index, int) or not 0 <= index < len(slots):
        raise RecipeError(
            f"There is no {what} {index}; the recipe has {len(slots)} slots (0..{len(slots) - 1})."
        )
    return index


def add_slot(slots: list[dict], expert: str, index: int | None = None) -> list[dict]:
    """A new plain slot holding `expert`, inserted before `index` (appended when None)."""
    out = copy.deepcopy(slots)
    index = len(out) if index is None else max(0, min(int(index), len(out)))
    out.insert(index, {"experts": [expert], "router": None})
    return out


def add_expert(slots: list[dict], slot: int, expert: str) -> list[dict]:
    """Add `expert` as one more candidate of slot `slot` (the slot becomes token-routed, top-1)."""
    out = copy.deepcopy(slots)
    _check_index(out, slot)
    if expert in out[slot]["experts"]:
        raise RecipeError(f"Slot {slot} already has expert '{expert}'; each candidate must be distinct.")
    out[slot] = _normalise({**out[slot], "experts": [*out[slot]["experts"], expert]})
    return out


def remove_slot(slots: list[dict], slot: int) -> list[dict]:
    out = copy.deepcopy(slots)
    del out[_check_index(out, slot)]
    return out


def remove_expert(slots: list[dict], slot: int, expert: str) -> list[dict]:
    """Remove one candidate; removing the last one removes the slot."""
    out = copy.deepcopy(slots)
    _check_index(out, slot)
    if expert not in out[slot]["experts"]:
        raise RecipeError(f"Slot {slot} has no expert '{expert}'.")
    experts = [e for e in out[slot]["experts"] if e != expert]
    if not experts:
        del out[slot]
    else:
        out[slot] = _normalise({**out[slot], "experts": experts})
    return out


def move_slot(slots: list[dict], slot: int, to: int) -> list[dict]:
    """Move slot `slot` so that it ends up at position `to` (clamped to the ends)."""
    out = copy.deepcopy(slots)
    moved = out.pop(_check_index(out, slot))
    out.insert(max(0, min(int(to), len(out))), moved)
    return out


def set_router(slots: list[dict], slot: int, router_type: str, top_k: int = 1) -> list[dict]:
    out = copy.deepcopy(slots)
    _check_index(out, slot)
    if len(out[slot]["experts"]) < 2:
        raise RecipeError(f"Slot {slot} has one expert; a router needs at least two candidates.")
    if router_type not in router_types():
        raise RecipeError(f"Router type '{router_type}' is not one of: {', '.join(router_types())}.")
    n = len(out[slot]["experts"])
    if takes_top_k(router_type) and not 1 <= int(top_k) <= n:
        raise RecipeError(f"top_k must be between 1 and {n} (the slot's number of experts), got {top_k}.")
    out[slot] = _normalise({**out[slot], "router": {"type": router_type, "top_k": int(top_k)}})
    return out


# ---- drafts <-> recipes -----------------------------------------------------------------------------


def board_slots(board: Any) -> list[dict]:
    """The slots of the board widget's value ({"models": ..., "slots": [...]}), checked: it comes from the
    browser, so a client may send anything."""
    slots = (board or {}).get("slots") if isinstance(board, dict) else None
    if slots is None:
        return []
    if not isinstance(slots, list) or len(slots) > 10_000:
        raise RecipeError("The board's slots must be a list.")
    out = []
    for i, slot in enumerate(slots):
        experts = slot.get("experts") if isinstance(slot, dict) else None
        if not isinstance(experts, list) or not all(isinstance(e, str) for e in experts):
            raise RecipeError(f"Slot {i} of the board has no list of experts ('alias:layer' strings).")
        router = slot.get("router")
        if router is not None and (
            not isinstance(router, dict) or not isinstance(router.get("top_k", 1), int | None)
        ):
            raise RecipeError(f"Slot {i} of the board has a router that is not {{type, top_k}}.")
        out.append({"experts": experts, "router": router})
    return out


def draft_recipe(
    name: str, base: str | None, adapter: str, rank: int | None, models: dict[str, str], slots: list[dict]
) -> dict:
    """The recipe dict of what the board shows. Only models the slots use (and the base) are listed, so a
    workspace of many models does not fill every recipe with unused ones."""
    used = [e.split(":", 1)[0] for s in slots for e in s.get("experts") or []]
    base = base or (used[0] if used else next(iter(models), ""))
    aliases = list(dict.fromkeys([base, *used]))
    adapter_spec: dict[str, Any] = {"type": adapter or AdapterSpec.type}
    if adapter != AdapterSpec.type and rank:  # the bottleneck: the one adapter with a rank
        adapter_spec["rank"] = _whole_number(rank, "The bottleneck rank", MAX_ADAPTER_RANK)
    out_slots = []
    for s in slots:
        entry: dict[str, Any] = {"experts": list(s.get("experts") or [])}
        if s.get("router") and len(entry["experts"]) > 1:
            r = s["router"]
            entry["router"] = {"type": r.get("type", RouterSpec.type)}
            if takes_top_k(entry["router"]["type"]):
                top_k = r.get("top_k") or RouterSpec.top_k
                entry["router"]["top_k"] = _whole_number(top_k, "top_k", len(entry["experts"]))
        out_slots.append(entry)
    return {
        "name": (name or "").strip(),
        "base": base,
        "models": {a: models[a] for a in aliases if a in models},
        "adapter": adapter_spec,
        "slots": out_slots,
    }


def _whole_number(value: Any, what: str, most: int) -> int:
    """A number from a board control, checked where it comes in (1e300 is no rank, and must not reach the
    YAML the board writes as a 301-digit integer)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != value
        or not 1 <= value <= most
    ):
        shown = value if isinstance(value, int | float) and abs(value) < 1e12 else "out of range"
        raise RecipeError(f"{what} must be a whole number between 1 and {most}, got {shown}.")
    if value != int(value):
        raise RecipeError(f"{what} must be a whole number, got {value}.")
    return int(value)


def draft_yaml(draft: dict) -> str:
    return yaml.safe_dump(draft, sort_keys=False, allow_unicode=True, width=120)


def slots_of(recipe: Recipe) -> list[dict]:
    """The board's slot list for a (valid) recipe."""
    return [
        _normalise(
            {
                "experts": [str(e) for e in s.experts],
                "router": {"type": s.router.type, "top_k": s.router.top_k} if s.router else None,
            }
        )
        for s in recipe.slots
    ]


def parse_recipe_text(text: str) -> tuple[Recipe, list[str]]:
    """A recipe from YAML text: Mango's own format, or mergekit's passthrough format (`slices:` with
    `layer_range`), with notes on what a mergekit import does differently. Raises `RecipeError`."""
    data = parse_yaml(
        text
    )  # text only, never a path; one-line RecipeError for bad YAML, deep nesting, huge numbers
    if isinstance(data, dict) and "slices" in data:
        imported = import_mergekit(data)
        return imported.recipe, imported.notes
    return Recipe.from_dict(data), []


def alias_for(ref: str, taken: dict[str, str] | list[str]) -> str:
    """A free alias derived from a folder name or Hub id ("assets/models/mango-bard" -> "bard")."""
    stem = (PurePosixPath(ref.rstrip("/")).name or "model").removeprefix("mango-")
    alias = "".join(ch if ALIAS_RE.match("m" + ch) else "_" for ch in stem)  # mol's alias characters
    if not alias[0].isalpha():
        alias = "m_" + alias
    alias = alias[:60]  # room for a "_2" suffix within mol's alias length
    out, n = alias, 2
    while out in taken:
        out, n = f"{alias}_{n}", n + 1
    return out
