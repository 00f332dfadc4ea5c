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
    return _slot_dicts(recipe.slots)


def _slot_dicts(slots: Any) -> list[dict]:
    return [
        _normalise(
            {
                "experts": [str(e) for e in s.experts],
                "router": {"type": s.router.type, "top_k": s.router.top_k} if s.router else None,
            }
        )
        for s in slots
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


# ---- lanes: several sources side by side, stitches between them, an output mixture -----------------------
# The board's lanes part: {"lanes": [{"name": str, "base": alias, "slots": [slot, ...] | None}], "stitches":
# [{"from": lane, "to": lane, "after": [i, j], "type": one of mol's STITCH_TYPES, "rank": int | None}],
# "mixture": one of mol's MIXTURE_TYPES}. A lane's slots None: its base's layers in order (mol's default); a list:
# any single-stream stack of slots on that base. The board value has it as "lanes" next to "slots" (then empty);
# "lanes" absent or None: a single-stream recipe.


def stitch_types() -> tuple[str, ...]:
    """mol's stitch types, read when asked for (mol may add more)."""
    return tuple(mol.recipe.STITCH_TYPES)


def mixture_types() -> tuple[str, ...]:
    return tuple(mol.recipe.MIXTURE_TYPES)


def mixture_label(kind: str) -> str:
    """mol's few words on what an output mixture of this type does (the type itself if mol has none)."""
    return mol.recipe.MIXTURE_DESCRIPTIONS.get(kind, kind)


def _lane_index(part: dict, lane: str) -> int:
    names = [ln["name"] for ln in part["lanes"]]
    if lane not in names:
        raise RecipeError(f"There is no lane '{lane}'; the lanes are: {', '.join(names) or 'none'}.")
    return names.index(lane)


def free_lane_name(part: dict, wanted: str) -> str:
    taken = {ln["name"] for ln in part.get("lanes") or []}
    out, n = wanted, 2
    while out in taken:
        out, n = f"{wanted}_{n}", n + 1
    return out


def new_lanes(bases: list[str], mixture: str | None = None) -> dict:
    """A lanes part with one lane per base (named after it), no stitches, the default mixture."""
    part: dict = {"lanes": [], "stitches": [], "mixture": mixture or mol.recipe.MixtureSpec.type}
    for b in bases:
        part = add_lane(part, b)
    return part


def add_lane(part: dict, base: str, name: str | None = None) -> dict:
    """One more lane: `base`'s layers in order (its slots can be edited afterwards)."""
    out = copy.deepcopy(part)
    out["lanes"].append({"name": free_lane_name(out, name or base), "base": base, "slots": None})
    return out


def remove_lane(part: dict, lane: str) -> dict:
    """Remove a lane and the stitches that join it."""
    out = copy.deepcopy(part)
    del out["lanes"][_lane_index(out, lane)]
    out["stitches"] = [s for s in out["stitches"] if lane not in (s.get("from"), s.get("to"))]
    return out


def set_lane_base(part: dict, lane: str, base: str) -> dict:
    """Run lane `lane` on another base model, with that model's layers in order. A lane named after its old base
    takes the new base's name where that is free (its stitches follow)."""
    out = copy.deepcopy(part)
    i = _lane_index(out, lane)
    old = out["lanes"][i]
    name = old["name"]
    if name == old["base"] and base not in {ln["name"] for ln in out["lanes"]}:
        name = base
        for s in out["stitches"]:
            s["from"] = name if s.get("from") == lane else s.get("from")
            s["to"] = name if s.get("to") == lane else s.get("to")
    out["lanes"][i] = {"name": name, "base": base, "slots": None}
    return out


def lane_name_problem(part: dict, lane: str, name: str) -> str | None:
    """Why lane `lane` cannot be called `name` (None: it can). A lane name is a key of the recipe's `lanes`, so
    mol's rule for it (ALIAS_RE) applies, and no two lanes may share one."""
    if not name:
        return "a lane needs a name"
    if name != lane and name in {ln["name"] for ln in part["lanes"]}:
        return f"there is a lane '{name}' already; each lane needs a name of its own"
    if not ALIAS_RE.match(name):
        return (
            f"'{name}' is not a lane name: it starts with a letter or '_' and has only letters, digits, "
            "'_', '-' and '.' (at most 64)"
        )
    return None


def rename_lane(part: dict, lane: str, name: str) -> dict:
    """Call lane `lane` `name` (surrounding spaces dropped); its stitches follow. The mixture names no lane (its
    gate follows the lanes' order, which stays), so it is unchanged."""
    out = copy.deepcopy(part)
    i = _lane_index(out, lane)
    name = name.strip() if isinstance(name, str) else ""
    problem = lane_name_problem(out, lane, name)
    if problem is not None:
        raise RecipeError(f"Lane '{lane}' is not renamed: {problem}.")
    out["lanes"][i]["name"] = name
    for s in out["stitches"]:
        s["from"] = name if s.get("from") == lane else s.get("from")
        s["to"] = name if s.get("to") == lane else s.get("to")
    return out


def set_lane_slots(part: dict, lane: str, slots: list[dict] | None) -> dict:
    """Give lane `lane` its own stack of slots (None: back to its base's layers in order). The slot operations
    above (add_slot, remove_slot, ...) edit such a list."""
    out = copy.deepcopy(part)
    i = _lane_index(out, lane)
    out["lanes"][i]["slots"] = None if slots is None else [_normalise(s) for s in slots]
    return out


def add_stitch(
    part: dict, source: str, target: str, after: tuple[int, int] | list[int], kind: str = "linear", rank=None
) -> dict:
    """A stitch: lane `source`'s state after its slot after[0] added into lane `target` after its slot after[1]
    (mol's plan checks that both slots exist)."""
    out = copy.deepcopy(part)
    _lane_index(out, source), _lane_index(out, target)
    if source == target:
        raise RecipeError(f"A stitch joins two lanes; '{source}' to itself is none.")
    if kind not in stitch_types():
        raise RecipeError(f"Stitch type '{kind}' is not one of: {', '.join(stitch_types())}.")
    if not (isinstance(after, list | tuple) and len(after) == 2):
        raise RecipeError("A stitch's 'after' is [slot of 'from', slot of 'to'].")
    a, b = (_whole_number(x + 1, "A stitch's slot number", mol.recipe.MAX_SLOTS) - 1 for x in after)
    out["stitches"].append(
        {
            "from": source,
            "to": target,
            "after": [a, b],
            "type": kind,
            "rank": rank if kind == "lowrank" else None,
        }
    )
    return out


def remove_stitch(part: dict, index: int) -> dict:
    out = copy.deepcopy(part)
    if not isinstance(index, int) or not 0 <= index < len(out["stitches"]):
        raise RecipeError(f"There is no stitch {index}; the recipe has {len(out['stitches'])}.")
    del out["stitches"][index]
    return out


def set_mixture(part: dict, kind: str) -> dict:
    if kind not in mixture_types():
        raise RecipeError(f"Mixture type '{kind}' is not one of: {', '.join(mixture_types())}.")
    return {**copy.deepcopy(part), "mixture": kind}


def lanes_of(recipe: Recipe) -> dict | None:
    """The board's lanes part of a (valid) recipe; None for a single-stream one."""
    if not recipe.lanes:
        return None
    return {
        "lanes": [
            {
                "name": name,
                "base": lane.base,
                "slots": None if lane.slots is None else _slot_dicts(lane.slots),
            }
            for name, lane in recipe.lanes.items()
        ],
        "stitches": [
            {"from": s.source, "to": s.target, "after": list(s.after), "type": s.type, "rank": s.rank}
            for s in recipe.stitches
        ],
        "mixture": (recipe.mixture or mol.recipe.MixtureSpec()).type,
    }


def board_value(recipe: Recipe, models: list[dict]) -> dict:
    """What the board shows for a recipe: its slots, or its lanes."""
    part = lanes_of(recipe)
    if part is None:
        return {"models": models, "slots": slots_of(recipe)}
    return {"models": models, "slots": [], **part}


def board_lanes(board: Any) -> dict | None:
    """The lanes part of the board widget's value, checked (it comes from the browser); None: one stream."""
    if not isinstance(board, dict) or board.get("lanes") is None:
        return None
    lanes, stitches = board.get("lanes"), board.get("stitches") or []
    if not isinstance(lanes, list) or len(lanes) > 256:
        raise RecipeError("The board's lanes must be a list.")
    if not isinstance(stitches, list) or len(stitches) > 10_000:
        raise RecipeError("The board's stitches must be a list.")
    out_lanes = []
    for i, lane in enumerate(lanes):
        if not isinstance(lane, dict) or not all(isinstance(lane.get(k), str) for k in ("name", "base")):
            raise RecipeError(f"Lane {i} of the board has no name and base model.")
        slots = None if lane.get("slots") is None else board_slots({"slots": lane["slots"]})
        out_lanes.append({"name": lane["name"], "base": lane["base"], "slots": slots})
    out_stitches = []
    for k, st in enumerate(stitches):
        after = st.get("after") if isinstance(st, dict) else None
        if (
            not isinstance(st, dict)
            or not all(isinstance(st.get(e), str) for e in ("from", "to"))
            or not isinstance(after, list)
            or len(after) != 2
            or not all(isinstance(a, int) and not isinstance(a, bool) for a in after)
        ):
            raise RecipeError(f"Stitch {k} of the board is not {{from, to, after: [i, j], type}}.")
        rank = st.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)):
            raise RecipeError(f"Stitch {k} of the board has a rank that is not a number.")
        out_stitches.append(
            {"from": st["from"], "to": st["to"], "after": list(after), "type": st.get("type"), "rank": rank}
        )
    mixture = board.get("mixture") or mol.recipe.MixtureSpec.type
    if not isinstance(mixture, str):
        raise RecipeError(f"The board's mixture is a type name ({', '.join(mixture_types())}).")
    return {"lanes": out_lanes, "stitches": out_stitches, "mixture": mixture}


def draft_lanes_recipe(
    name: str, base: str | None, adapter: str, rank: int | None, models: dict[str, str], part: dict
) -> dict:
    """The recipe dict of a lanes board (the key order of mol's `Recipe.to_dict`). Only the models the lanes use
    are listed; the base stays the chosen one when a lane uses it, else it is the first lane's."""
    used = [
        a
        for lane in part["lanes"]
        for a in [lane["base"], *(e.split(":", 1)[0] for s in lane.get("slots") or [] for e in s["experts"])]
    ]
    if base not in used:
        base = used[0] if used else next(iter(models), "")
    single = draft_recipe(name, base, adapter, rank, models, [])
    lanes: dict[str, Any] = {}
    for lane in part["lanes"]:
        entry: dict[str, Any] = {"base": lane["base"]}
        if lane.get("slots") is not None:
            entry["slots"] = draft_recipe("", lane["base"], adapter, rank, models, lane["slots"])["slots"]
        lanes[lane["name"]] = entry
    stitches = []
    for st in part["stitches"]:
        entry = {
            "from": st["from"],
            "to": st["to"],
            "after": list(st["after"]),
            "type": st.get("type") or "linear",
        }
        if entry["type"] == "lowrank" and st.get("rank") is not None:
            entry["rank"] = _whole_number(st["rank"], "A stitch's rank", MAX_ADAPTER_RANK)
        stitches.append(entry)
    return {
        "name": single["name"],
        "base": base,
        "models": {a: models[a] for a in dict.fromkeys([base, *used]) if a in models},
        "adapter": single["adapter"],
        "lanes": lanes,
        "stitches": stitches,
        "mixture": {"type": part.get("mixture") or mol.recipe.MixtureSpec.type},
    }


def board_draft(
    name: str, base: str | None, adapter: str, rank: int | None, models: dict[str, str], board: Any
) -> dict:
    """The recipe dict of what the board shows, one stream or lanes."""
    part = board_lanes(board)
    if part is None:
        return draft_recipe(name, base, adapter, rank, models, board_slots(board))
    return draft_lanes_recipe(name, base, adapter, rank, models, part)


def board_has_content(board: Any) -> bool:
    """Whether the board holds anything to plan (slots, or lanes)."""
    part = board_lanes(board)
    return bool(part["lanes"]) if part is not None else bool(board_slots(board))
