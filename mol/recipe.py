"""The recipe: pure, validated data naming source models and the fused model's slots.

Canonical YAML (what `to_yaml` writes)::

    name: prose-code
    base: bard
    models: {bard: assets/models/mango-bard, coder: assets/models/mango-coder}
    adapter: {type: linear}
    slots:
      - experts: ["bard:0"]
      - experts: ["bard:1", "coder:1"]
        router: {type: token, top_k: 1}

Shorthands accepted on input: a slot may be a string ("bard:0"), an inclusive range ("bard:0-3", several
plain slots) or a list of experts (token-routed, top-1); `router` may be a string ("token", "pooled");
`adapter` may be a string ("linear", "bottleneck").

Text is text: `Recipe.from_yaml` parses the string it is given and never opens a file, whatever the string
looks like; `Recipe.from_file` reads a file. Every way a text can be wrong (bad YAML, nesting, numbers of
thousands of digits, unknown tags) ends in a one-line `RecipeError` quoting at most a short excerpt."""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mol.errors import RecipeError

MAX_ADAPTER_RANK = 65536
DEFAULT_BOTTLENECK_RANK = 64
ADAPTER_TYPES = ("linear", "bottleneck")
MAX_SLOTS = 4096
MAX_LAYER = 100_000  # exclusive: no model has that many layers, and it keeps numbers in messages short
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
ALIAS_RE = _ALIAS_RE  # what a model alias may be, for callers that check one before writing a recipe
_EXPERT_RE = re.compile(r"^\s*([^:\s]+)\s*:\s*(-?\d+)\s*$")
_RANGE_RE = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class ExpertRef:
    """Layer `layer` of the model with alias `model`."""

    model: str
    layer: int

    def __str__(self) -> str:
        return f"{self.model}:{self.layer}"

    @classmethod
    def parse(cls, value: Any, where: str) -> ExpertRef:
        if isinstance(value, ExpertRef):
            return value
        if isinstance(value, dict) and set(value) == {"model", "layer"}:
            model, layer = value["model"], value["layer"]
            if isinstance(layer, int) and not isinstance(layer, bool):
                _layer_index(layer, where)  # before formatting: str() of a huge int raises
            value = f"{model if isinstance(model, str) else _short(model)}:{_short(layer)}"
        if not isinstance(value, str):
            raise RecipeError(
                f"{where}: an expert is written 'alias:layer' (e.g. \"bard:3\"), got {_short(value)}."
            )
        m = _EXPERT_RE.match(value)
        if not m:
            raise RecipeError(f"{where}: '{_short(value)}' is not 'alias:layer' (e.g. \"bard:3\").")
        return cls(m.group(1), _layer_index(m.group(2), where))


@dataclass(frozen=True)
class RouterSpec:
    type: str = "token"
    top_k: int = 1

    def to_dict(self) -> dict:
        return {"type": self.type, "top_k": self.top_k} if self.takes_top_k else {"type": self.type}

    @property
    def takes_top_k(self) -> bool:
        return router_kind(self.type).takes_top_k

    @property
    def per_sequence(self) -> bool:
        """One decision per sequence (a pooled router) rather than per token."""
        return router_kind(self.type).per_sequence


@dataclass(frozen=True)
class AdapterSpec:
    type: str = "linear"
    rank: int | None = None  # bottleneck only

    def to_dict(self) -> dict:
        return {"type": self.type} if self.rank is None else {"type": self.type, "rank": self.rank}


@dataclass(frozen=True)
class Slot:
    experts: tuple[ExpertRef, ...]
    router: RouterSpec | None = None  # None for a single-expert (plain stacking) slot

    @property
    def routed(self) -> bool:
        return len(self.experts) > 1

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"experts": [str(e) for e in self.experts]}
        if self.router is not None:
            out["router"] = self.router.to_dict()
        return out


MIXTURE_TYPES = ("token", "sequence", "evidence")
MIXTURE_DESCRIPTIONS = {  # what each output mixture does, in a few words (the CLI and the studio show them)
    "token": "a gate per token, read from the lanes' states",
    "sequence": "one lane per sequence, chosen from the prompt",
    "evidence": "a gate per token, by how well each lane predicted the last tokens",
}
STITCH_TYPES = ("linear", "lowrank", "cross-attention")
MAX_STITCH_HEADS = 1024


@dataclass(frozen=True)
class LaneSpec:
    """A source run on its own residual stream, with its own embeddings, positions, final norm and head: its
    `base`'s layers in order (slots None), or any single-stream stack of slots on that base."""

    base: str
    slots: tuple[Slot, ...] | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"base": self.base}
        if self.slots is not None:
            out["slots"] = [s.to_dict() for s in self.slots]
        return out


@dataclass(frozen=True)
class StitchSpec:
    """A gated adapter adding lane `source`'s state after its slot `after[0]` into lane `target`'s stream after
    its slot `after[1]` (zero at start: an untrained stitch changes nothing)."""

    source: str
    target: str
    after: tuple[int, int]
    type: str = "linear"
    rank: int | None = None  # lowrank: its bottleneck; cross-attention: its width (None: the target's)
    heads: int | None = None  # cross-attention only (None: about one per 64 channels of its width)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "from": self.source,
            "to": self.target,
            "after": list(self.after),
            "type": self.type,
        }
        if self.rank is not None:
            out["rank"] = self.rank
        if self.heads is not None:
            out["heads"] = self.heads
        return out


@dataclass(frozen=True)
class MixtureSpec:
    """The output mixture of the lanes' next-token distributions: a gate per token read from the lanes' states
    (token), one decision per sequence taken from the prompt (sequence: only the chosen lane then runs for the
    generated tokens), or a gate per token from how well each lane predicted the recent tokens (evidence: a
    switching Bayesian mixture, which needs no labelled domain to fall back to the best lane; the default, being
    the one that stays at least as good as the best lane on text unlike any it was tuned on)."""

    type: str = "evidence"

    def to_dict(self) -> dict:
        return {"type": self.type}


@dataclass
class Recipe:
    name: str
    base: str
    models: dict[str, str]
    slots: list[Slot]
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    # Folder that relative model paths are resolved against first (the recipe file's folder).
    source_dir: Path | None = field(default=None, compare=False)
    # Several sources side by side (each its own stream and head), joined by stitches and an output mixture;
    # empty: one stream, `slots`.
    lanes: dict[str, LaneSpec] = field(default_factory=dict)
    stitches: list[StitchSpec] = field(default_factory=list)
    mixture: MixtureSpec | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source_dir: Path | None = None) -> Recipe:
        _check_size(data)
        if not isinstance(data, dict):
            raise RecipeError(
                f"A recipe is a mapping with keys name, base, models, slots; got {_short(data)}."
            )
        _reject_unknown(
            data,
            ("adapter", "base", "description", "lanes", "mixture", "models", "name", "slots", "stitches"),
            "Unknown recipe key(s)",
        )
        if data.get("lanes") is not None:
            return cls._from_lanes_dict(data, source_dir)
        for key in ("name", "models", "slots"):
            if key not in data or data[key] in (None, "", [], {}):
                raise RecipeError(f"The recipe needs '{key}'.")
        name, models = _parse_name_and_models(data)
        base = data.get("base")
        if base is None:
            base = next(iter(models))
        if not isinstance(base, str):
            raise RecipeError(
                f"'base' must be one of the model aliases ({', '.join(models)}), got {_short(base)}."
            )
        adapter = _parse_adapter(data.get("adapter"))
        raw_slots = data["slots"]
        if not isinstance(raw_slots, list):
            raise RecipeError(
                "'slots' is a list; each slot is {experts: [\"alias:layer\", ...], router: {...}}."
            )
        slots: list[Slot] = []
        for i, raw in enumerate(raw_slots):
            slots.extend(_parse_slot(raw, f"slots[{i}]"))
            if len(slots) > MAX_SLOTS:
                raise RecipeError(f"The recipe has more than {MAX_SLOTS} slots.")
        return cls(
            name=name.strip(), base=base, models=models, slots=slots, adapter=adapter, source_dir=source_dir
        )

    @classmethod
    def _from_lanes_dict(cls, data: dict, source_dir: Path | None) -> Recipe:
        if data.get("slots") not in (None, [], {}):
            raise RecipeError(
                "A recipe with 'lanes' gives each lane its slots; remove the top-level 'slots'."
            )
        name, models = _parse_name_and_models(data)
        raw_lanes = data["lanes"]
        if not isinstance(raw_lanes, dict) or len(raw_lanes) < 2:
            raise RecipeError("'lanes' maps two or more lane names to {base: alias, slots: [...]}.")
        lanes: dict[str, LaneSpec] = {}
        for lane_name, raw in raw_lanes.items():
            where = f"lanes.{_short(lane_name)}"
            if not isinstance(lane_name, str) or not _ALIAS_RE.match(lane_name):
                raise RecipeError(f"{where}: a lane name uses letters, digits, '_', '-', '.' (max 64).")
            if isinstance(raw, str):
                raw = {"base": raw}
            if not isinstance(raw, dict):
                raise RecipeError(
                    f"{where} is {{base: alias}} or {{base: alias, slots: [...]}}, got {_short(raw)}."
                )
            _reject_unknown(raw, ("base", "slots"), f"{where}: unknown key(s)")
            lane_slots = None
            if raw.get("slots") is not None:
                if not isinstance(raw["slots"], list) or not raw["slots"]:
                    raise RecipeError(f"{where}.slots is a non-empty list of slots.")
                lane_slots = []
                for i, slot in enumerate(raw["slots"]):
                    lane_slots.extend(_parse_slot(slot, f"{where}.slots[{i}]"))
                lane_slots = tuple(lane_slots)
            lanes[lane_name] = LaneSpec(raw.get("base"), lane_slots)
        stitches = []
        raw_stitches = data.get("stitches") or []
        if not isinstance(raw_stitches, list):
            raise RecipeError("'stitches' is a list of {from: lane, to: lane, after: [i, j], type: linear}.")
        for k, raw in enumerate(raw_stitches):
            stitches.append(_parse_stitch(raw, f"stitches[{k}]"))
        mixture = _parse_mixture(data.get("mixture"))
        base = data.get("base") or next(iter(lanes.values())).base
        return cls(
            name=name.strip(),
            base=base,
            models=models,
            slots=[],
            adapter=_parse_adapter(data.get("adapter")),
            source_dir=source_dir,
            lanes=lanes,
            stitches=stitches,
            mixture=mixture,
        )

    def lane_recipe(self, lane: str, layers: int | None = None) -> Recipe:
        """Lane `lane` as a single-stream recipe of its own (a lane without slots: its base's `layers` in order)."""
        spec = self.lanes[lane]
        slots = (
            list(spec.slots)
            if spec.slots is not None
            else [Slot((ExpertRef(spec.base, i),)) for i in range(layers)]
        )
        return Recipe(
            name=f"{self.name}.{lane}",
            base=spec.base,
            models=self.models,
            slots=slots,
            adapter=self.adapter,
            source_dir=self.source_dir,
        )

    @classmethod
    def from_yaml(cls, text: str, source_dir: Path | None = None) -> Recipe:
        """Parse recipe YAML text. Never opens a file: a one-line "x.yaml" is a YAML string, not a path."""
        if not isinstance(text, str):
            raise TypeError(
                f"Recipe.from_yaml takes YAML text, not {type(text).__name__}; "
                "to read a file use Recipe.from_file(path)."
            )
        data = parse_yaml(text)
        if isinstance(data, str) and source_dir is None:  # most likely a path meant for from_file
            raise RecipeError(
                f"A recipe is a mapping with keys name, base, models, slots; got the single string "
                f"'{_short(data)}' (this is parsed as recipe text; a file is read by Recipe.from_file)."
            )
        return cls.from_dict(data, source_dir=source_dir)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a recipe YAML file; relative model paths are then resolved from the file's folder first."""
        path = Path(path)
        return cls.from_yaml(read_text_file(path), source_dir=path.resolve().parent)

    # ---- output ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        if self.lanes:
            return {
                "name": self.name,
                "base": self.base,
                "models": dict(self.models),
                "adapter": self.adapter.to_dict(),
                "lanes": {n: lane.to_dict() for n, lane in self.lanes.items()},
                "stitches": [s.to_dict() for s in self.stitches],
                "mixture": (self.mixture or MixtureSpec()).to_dict(),
            }
        return {
            "name": self.name,
            "base": self.base,
            "models": dict(self.models),
            "adapter": self.adapter.to_dict(),
            "slots": [s.to_dict() for s in self.slots],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    # ---- checks that need no model files -------------------------------------------------------------
    def validate(self) -> None:
        _check_aliases(self.models)
        if self.base not in self.models:
            raise RecipeError(
                f"base '{_short(self.base)}' is not one of the model aliases: {', '.join(self.models)}."
            )
        if self.lanes:
            self._validate_lanes()
            return
        if not self.slots:
            raise RecipeError('The recipe has no slots; add at least one, e.g. {experts: ["base:0"]}.')
        for i, slot in enumerate(self.slots):
            if not slot.experts:
                raise RecipeError(f"slots[{i}] has no experts; give at least one 'alias:layer'.")
            for e in slot.experts:
                if e.model not in self.models:
                    raise RecipeError(
                        f"slots[{i}]: expert '{e}' names unknown model alias '{e.model}'. "
                        f"Known aliases: {', '.join(self.models)}."
                    )
            if len(set(slot.experts)) != len(slot.experts):
                raise RecipeError(f"slots[{i}] lists the same expert twice; each candidate must be distinct.")
            if slot.router is not None and slot.router.takes_top_k and slot.router.top_k > len(slot.experts):
                raise RecipeError(
                    f"slots[{i}]: top_k={slot.router.top_k} is larger than the number of experts "
                    f"({len(slot.experts)}); use top_k between 1 and {len(slot.experts)}."
                )

    def _validate_lanes(self) -> None:
        for name, lane in self.lanes.items():
            if lane.base not in self.models:
                raise RecipeError(
                    f"lanes.{name}: base '{_short(lane.base)}' is not one of the model aliases: "
                    f"{', '.join(self.models)}."
                )
            if lane.slots is not None:
                self.lane_recipe(name)  # its slots checked as a recipe's are
        for k, st in enumerate(self.stitches):
            for end in (st.source, st.target):
                if end not in self.lanes:
                    raise RecipeError(
                        f"stitches[{k}]: '{_short(end)}' is not a lane: {', '.join(self.lanes)}."
                    )
            if st.source == st.target:
                raise RecipeError(f"stitches[{k}] joins lane '{st.source}' to itself; join two lanes.")

    @property
    def used_aliases(self) -> list[str]:
        if self.lanes:
            seen: list[str] = []
            for lane in self.lanes.values():
                for alias in [lane.base] + [e.model for s in lane.slots or () for e in s.experts]:
                    if alias not in seen:
                        seen.append(alias)
            return seen
        seen = [self.base]
        for s in self.slots:
            for e in s.experts:
                if e.model not in seen:
                    seen.append(e.model)
        return seen

    def describe(self) -> str:
        routed = sum(s.routed for s in self.slots)
        return f"{self.name}: {len(self.slots)} slots ({routed} routed), base {self.base}, models {', '.join(self.models)}"


def to_recipe(value: Recipe | Path | str) -> Recipe:
    """What the library's functions take as a recipe: a Recipe, a Path to a YAML file, or YAML text. A str is
    always text, never a path (DESIGN decision 11): a path must arrive as a Path, or go through from_file."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, Path):
        return Recipe.from_file(value)
    if isinstance(value, str):
        return Recipe.from_yaml(value)
    raise TypeError(
        f"Expected a Recipe, a Path to a recipe file or recipe YAML text, not {type(value).__name__}."
    )


def _parse_name_and_models(data: dict) -> tuple[str, dict[str, str]]:
    """The recipe's name and its models (alias -> folder or Hub id), checked."""
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"'name' must be a non-empty string, got {_short(name)}.")
    models = data.get("models")
    if isinstance(models, list):  # shorthand: a list of paths, aliases are folder names
        models = {Path(str(m)).name.replace(" ", "_") or f"m{i}": m for i, m in enumerate(models)}
    if not isinstance(models, dict) or not models:
        raise RecipeError(
            "'models' maps aliases to local folders or Hub ids, e.g. {bard: assets/models/mango-bard}."
        )
    models = {str(k): v for k, v in models.items()}
    _check_aliases(models)
    for alias, ref in models.items():
        if not isinstance(ref, str) or not ref.strip():
            raise RecipeError(
                f"models.{alias}: give a local folder or a Hub id as a string, got {_short(ref)}."
            )
    return name, models


def _check_aliases(models: dict) -> None:
    for alias in models:
        if not _ALIAS_RE.match(alias):
            raise RecipeError(
                f"Model alias '{_short(alias)}' is not allowed: use letters, digits, '_', '-', '.' (max 64), "
                "starting with a letter."
            )


def _reject_unknown(raw: dict, allowed: tuple[str, ...], lead: str) -> None:
    """One message for every mapping of the format: `lead`, the unknown keys, then the allowed ones."""
    unknown = sorted(_short(k) for k in raw if k not in allowed)
    if unknown:
        raise RecipeError(f"{lead}: {', '.join(unknown)}; allowed: {', '.join(allowed)}.")


def _parse_adapter(raw: Any) -> AdapterSpec:
    if raw is None:
        return AdapterSpec()
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise RecipeError("'adapter' is {type: linear} or {type: bottleneck, rank: 64}.")
    _reject_unknown(raw, ("type", "rank"), "adapter: unknown key(s)")
    kind = raw.get("type", "linear")
    if kind not in ADAPTER_TYPES:
        raise RecipeError(f"adapter.type '{_short(kind)}' is not one of: {', '.join(ADAPTER_TYPES)}.")
    rank = raw.get("rank")
    if kind == "bottleneck":
        rank = DEFAULT_BOTTLENECK_RANK if rank is None else rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_ADAPTER_RANK:
            raise RecipeError(
                f"adapter.rank must be an integer between 1 and {MAX_ADAPTER_RANK}, got {_short(rank)}."
            )
    elif rank is not None:
        raise RecipeError(
            "adapter.rank applies to the bottleneck adapter only; remove it or use type: bottleneck."
        )
    return AdapterSpec(kind, rank)


def router_types() -> list[str]:
    """The router kinds a recipe's slots may name: those registered in mol.network.routers that read a slot's
    hidden states (not the lanes' evidence gate, which reads the lanes' predictions), imported here, with torch,
    only once a recipe has a router."""
    from mol.network.routers import ROUTERS

    return sorted(k for k, cls in ROUTERS.items() if getattr(cls, "reads", "states") == "states")


def router_kind(kind: str):
    from mol.network.routers import router_kind as registered

    return registered(kind)


def __getattr__(name: str):
    if name == "ROUTER_TYPES":  # the registered kinds, read when asked for
        return tuple(router_types())
    raise AttributeError(f"module 'mol.recipe' has no attribute '{name}'")


def _parse_router(raw: Any, n_experts: int, where: str) -> RouterSpec | None:
    if raw is None:
        return RouterSpec() if n_experts > 1 else None
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}.router is {{type: token, top_k: 1}} or {{type: pooled}}, got {_short(raw)}."
        )
    _reject_unknown(raw, ("type", "top_k"), f"{where}.router: unknown key(s)")
    kind = raw.get("type", "token")
    if not isinstance(kind, str) or kind not in router_types():
        raise RecipeError(f"{where}.router.type '{_short(kind)}' is not one of: {', '.join(router_types())}.")
    top_k = raw.get("top_k", 1)
    upper = n_experts if n_experts > 1 else MAX_SLOTS  # a one-expert slot drops its router below
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= upper:
        raise RecipeError(
            f"{where}.router.top_k must be an integer between 1 and {upper}, got {_short(top_k)}."
        )
    if not router_kind(kind).takes_top_k and top_k != 1:
        once = " per sequence" if router_kind(kind).per_sequence else ""
        raise RecipeError(f"{where}.router: a {kind} router runs one expert{once}; remove top_k.")
    if n_experts == 1:
        return None  # a router over one expert is plain stacking
    return RouterSpec(kind, top_k)


def _parse_stitch(raw: Any, where: str) -> StitchSpec:
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where} is {{from: lane, to: lane, after: [i, j], type: linear}}, got {_short(raw)}."
        )
    _reject_unknown(raw, ("after", "from", "heads", "rank", "to", "type"), f"{where}: unknown key(s)")
    after = raw.get("after")
    if (
        not isinstance(after, list)
        or len(after) != 2
        or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < MAX_SLOTS for a in after)
    ):
        raise RecipeError(
            f"{where}.after is [slot of 'from', slot of 'to'] (two slot indices), got {_short(after)}."
        )
    kind = raw.get("type", "linear")
    if kind not in STITCH_TYPES:
        raise RecipeError(f"{where}.type '{_short(kind)}' is not one of: {', '.join(STITCH_TYPES)}.")
    rank = raw.get("rank")
    if kind == "lowrank":
        rank = DEFAULT_BOTTLENECK_RANK if rank is None else rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_ADAPTER_RANK:
            raise RecipeError(f"{where}.rank must be an integer between 1 and {MAX_ADAPTER_RANK}.")
    elif kind == "cross-attention":
        if rank is not None and (
            not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_ADAPTER_RANK
        ):
            raise RecipeError(
                f"{where}.rank (the attention's width) must be an integer between 1 and {MAX_ADAPTER_RANK}."
            )
    elif rank is not None:
        raise RecipeError(f"{where}.rank applies to a lowrank or cross-attention stitch only.")
    heads = raw.get("heads")
    if heads is not None:
        if kind != "cross-attention":
            raise RecipeError(f"{where}.heads applies to a cross-attention stitch only.")
        if not isinstance(heads, int) or isinstance(heads, bool) or not 1 <= heads <= MAX_STITCH_HEADS:
            raise RecipeError(
                f"{where}.heads must be an integer between 1 and {MAX_STITCH_HEADS}, got {_short(heads)}."
            )
        if rank is not None and rank % heads:
            raise RecipeError(f"{where}: {heads} heads do not divide the attention's width (rank {rank}).")
    source, target = raw.get("from"), raw.get("to")
    if not isinstance(source, str) or not isinstance(target, str):
        raise RecipeError(f"{where}: 'from' and 'to' name lanes.")
    return StitchSpec(source, target, (after[0], after[1]), kind, rank, heads)


def _parse_mixture(raw: Any) -> MixtureSpec:
    if raw is None:
        return MixtureSpec()
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise RecipeError("'mixture' is {type: token}, {type: sequence} or {type: evidence}.")
    _reject_unknown(raw, ("type",), "mixture: unknown key(s)")
    kind = raw.get("type", "token")
    if kind not in MIXTURE_TYPES:
        raise RecipeError(f"mixture.type '{_short(kind)}' is not one of: {', '.join(MIXTURE_TYPES)}.")
    return MixtureSpec(kind)


def _parse_slot(raw: Any, where: str) -> list[Slot]:
    if isinstance(raw, str):
        m = _RANGE_RE.match(raw)
        if m:
            alias, lo, hi = m.group(1), _layer_index(m.group(2), where), _layer_index(m.group(3), where)
            if hi < lo:
                raise RecipeError(f"{where}: range '{_short(raw)}' ends before it starts.")
            if hi - lo >= MAX_SLOTS:
                raise RecipeError(f"{where}: range '{_short(raw)}' is longer than {MAX_SLOTS} layers.")
            return [Slot((ExpertRef(alias, i),)) for i in range(lo, hi + 1)]
        return [Slot((ExpertRef.parse(raw, where),))]
    if isinstance(raw, list):
        raw = {"experts": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f'{where}: a slot is {{experts: ["alias:layer", ...]}}, got {_short(raw)}.')
    _reject_unknown(raw, ("experts", "router"), f"{where}: unknown key(s)")
    experts = raw.get("experts")
    if isinstance(experts, str):
        experts = [experts]
    if not isinstance(experts, list) or not experts:
        raise RecipeError(f'{where}: \'experts\' must be a non-empty list like ["bard:1", "coder:1"].')
    refs = tuple(ExpertRef.parse(e, f"{where}.experts[{j}]") for j, e in enumerate(experts))
    return [Slot(refs, _parse_router(raw.get("router"), len(refs), where))]


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 4, 4, 2


def _short(value: Any, limit: int = 60) -> str:
    """A bounded view of a bad value for a message (a full repr of a YAML alias bomb never finishes)."""
    try:
        text = value if isinstance(value, str) else _REPR.repr(value)
    except ValueError:  # an int too long for str() (Python refuses past 4300 digits)
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    text = " ".join(text.split()) if "\n" in text or "\r" in text else text  # messages stay on one line
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _layer_index(value: str | int, where: str) -> int:
    """A layer index from its digits or an int, refused when absurd (before int(): 5000 digits raise)."""
    if isinstance(value, str):
        value = int(value) if len(value.lstrip("-")) <= len(str(MAX_LAYER)) else MAX_LAYER
    if value < 0:
        raise RecipeError(f"{where}: layer index {_short(value, 20)} is negative; layers count from 0.")
    if value >= MAX_LAYER:
        raise RecipeError(
            f"{where}: layer index out of range; layers count from 0 and stay below {MAX_LAYER:,}."
        )
    return value


MAX_YAML_CHARS = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64  # a recipe nests 4 levels; deeper is hostile, and yaml's composer would hit RecursionError
MAX_NUMBER_CHARS = 100  # a number's text; Python's int() refuses past 4300 digits with a ValueError


class _Loader(yaml.SafeLoader):
    """safe_load with a nesting limit and a length limit on integers, both reported with a line number."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value):,} characters", node.start_mark
            )
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def parse_yaml(text: str, what: str = "recipe") -> Any:
    """YAML text to plain data (safe_load), every failure a one-line RecipeError. Touches no file."""
    if not isinstance(text, str):
        raise TypeError(f"parse_yaml takes YAML text, not {type(text).__name__}.")
    if len(text) > MAX_YAML_CHARS:
        raise RecipeError(f"The {what} text is {len(text):,} characters; the limit is {MAX_YAML_CHARS:,}.")
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"The {what} is not valid YAML{where}: {_short(problem, 120)}.") from None
    except RecursionError:
        raise RecipeError(f"The {what} is nested too deeply to read.") from None
    except (ValueError, OverflowError) as exc:  # e.g. a timestamp like 2024-13-45
        raise RecipeError(f"The {what} holds a value YAML cannot read: {_short(str(exc), 120)}.") from None


MAX_FILE_BYTES = 4 * MAX_YAML_CHARS  # UTF-8 takes at most 4 bytes a character


def read_text_file(path: Path, what: str = "recipe") -> str:
    """A UTF-8 text file's contents, or a one-line RecipeError saying why not (missing, a folder, too large...)."""
    shown = _short(str(path), 200)
    if path.is_dir():
        raise RecipeError(f"'{shown}' is a folder, not a {what} file.")
    if not path.is_file():
        raise RecipeError(f"The {what} file '{shown}' does not exist.")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(
            f"Cannot read the {what} file '{shown}': {exc.strerror or type(exc).__name__}."
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise RecipeError(
            f"The {what} file '{shown}' is larger than {MAX_FILE_BYTES:,} bytes; a {what} is far smaller."
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"The {what} file '{shown}' is not UTF-8 text (byte {exc.start}).") from None


def _check_size(data: Any) -> None:
    """Refuse documents whose expansion is huge (YAML aliases can make a few lines expand exponentially)."""
    budget, stack = MAX_NODES, [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise RecipeError(
                f"The recipe is too large: more than {MAX_NODES:,} values once YAML aliases are "
                "expanded. Write the slots out, or split the recipe."
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
