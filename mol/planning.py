"""Plan: a recipe resolved against its source models' configs and safetensors headers. Every
incompatibility is found here, before a byte of weights is read."""

from __future__ import annotations

from dataclasses import dataclass, field

from mol import costs, dtypes
from mol.access import LOCAL, AccessPolicy
from mol.errors import (
    CheckpointError,
    IncompatibleModelsError,
    MolError,
    RecipeError,
    UnsupportedArchitectureError,
)
from mol.recipe import MixtureSpec, Recipe, Slot
from mol.sources import ModelSource, TensorInfo, load_source, one_line


@dataclass(frozen=True)
class ExpertPlan:
    name: str  # "alias:layer"
    alias: str
    layer: int
    width: int
    cache_index: int  # this expert's own layer in the fused KV cache
    adapter: str | None  # None: the block runs directly in the base stream; else "linear"/"bottleneck"
    add_positions: bool  # absolute-position block in a foreign stream: add its own position embedding
    window: int | None = None  # sliding-window attention of this layer in its source (None: full attention)


@dataclass(frozen=True)
class SlotPlan:
    index: int
    slot: Slot
    experts: tuple[ExpertPlan, ...]

    @property
    def routed(self) -> bool:
        return len(self.experts) > 1


@dataclass
class Plan:
    recipe: Recipe
    sources: dict[str, ModelSource]
    slots: list[SlotPlan]
    reads: dict[str, list[TensorInfo]]  # alias -> tensors to read
    warnings: list[str] = field(default_factory=list)
    lanes: dict[str, Plan] = field(
        default_factory=dict
    )  # a lanes recipe: each lane planned as a recipe of its own

    @property
    def base(self) -> ModelSource:
        return self.sources[self.recipe.base]

    @property
    def width(self) -> int:
        return self.base.width

    @property
    def bytes_to_read(self) -> int:
        return sum(t.nbytes for ts in self.reads.values() for t in ts)

    @property
    def tensors_to_read(self) -> int:
        return sum(len(ts) for ts in self.reads.values())

    @property
    def cache_layers(self) -> int:
        if self.lanes:
            return sum(p.cache_layers for p in self.lanes.values())
        return sum(len(s.experts) for s in self.slots)

    def stitch_parameters(self) -> int:
        total = 0
        for st in self.recipe.stitches:
            a, b = self.lanes[st.source].width, self.lanes[st.target].width
            # the gate scalar and the map (cross-attention: queries and output on the target's side, keys and
            # values on the source's, each of the attention's width)
            if st.type == "cross-attention":
                total += 1 + 2 * (st.rank or b) * (a + b)
            else:
                total += 1 + (a * b if st.type == "linear" else st.rank * (a + b))
        return total

    def gate_parameters(self) -> int:
        """The output mixture's gate: from the lanes' final states to one score per lane (an evidence gate: a prior
        per lane, a scale and a decay)."""
        if not self.lanes:
            return 0
        if self.recipe.mixture is not None and self.recipe.mixture.type == "evidence":
            return len(self.lanes) + 2
        return (sum(p.width for p in self.lanes.values()) + 1) * len(self.lanes)

    def adapter_parameters(self) -> int:
        if self.lanes:
            return sum(p.adapter_parameters() for p in self.lanes.values())
        total, d = 0, self.width
        for s in self.slots:
            for e in s.experts:
                if e.adapter == "linear":
                    total += 2 * d * e.width
                elif e.adapter == "bottleneck":
                    r = self.recipe.adapter.rank or 64
                    total += 2 * r * (d + e.width)
        return total

    def router_parameters(self) -> int:
        if self.lanes:
            return sum(p.router_parameters() for p in self.lanes.values()) + self.gate_parameters()
        return sum((self.width + 1) * len(s.experts) for s in self.slots if s.routed)

    def memory_estimate(
        self, dtype: str = "float32", context_tokens: int = 2048, batch: int = 1
    ) -> dict[str, int]:
        """Bytes of device memory: weights (in `dtype`), trainable parts, and the KV cache for `context_tokens`."""
        size = dtypes.itemsize(dtype)
        weights = 0
        for ts in self.reads.values():
            for t in ts:
                elem = dtypes.itemsize(t.dtype)
                weights += t.nbytes // elem * size
        trainable = (self.adapter_parameters() + self.router_parameters() + self.stitch_parameters()) * size
        kv = 0
        for s in [s for p in self.lanes.values() for s in p.slots] or self.slots:
            for e in s.experts:
                src = self.sources[e.alias]
                head_dim = getattr(src.config, "head_dim", None) or src.width // src.heads
                kv += 2 * src.kv_heads * head_dim * size
        kv *= context_tokens * batch
        return {"weights": weights, "trainable": trainable, "kv_cache": kv, "total": weights + trainable + kv}

    def flops_per_token(self, context_tokens: int = costs.DEFAULT_CONTEXT) -> dict:
        """Forward FLOPs per token at `context_tokens`, and each source's alone (mol.costs.plan_flops)."""
        return costs.plan_flops(self, context_tokens)

    def summary(self) -> str:
        r = self.recipe
        if self.lanes:
            lines = [
                f"Recipe '{r.name}': {len(self.lanes)} lanes, {len(r.stitches)} stitches, "
                f"{(r.mixture or MixtureSpec()).type} mixture of their outputs."
            ]
            for name, lane in self.lanes.items():
                routed = sum(s.routed for s in lane.slots)
                lines.append(
                    f"  lane {name}: base '{lane.recipe.base}' (width {lane.width}), {len(lane.slots)} slots, "
                    f"{routed} routed"
                )
            for st in r.stitches:
                lines.append(
                    f"  stitch {st.source} (after slot {st.after[0]}) -> {st.target} (after slot {st.after[1]}), {st.type}"
                    + _stitch_shape(st, self.lanes[st.target].width)
                )
        else:
            lines = [
                f"Recipe '{r.name}': {len(self.slots)} slots, {sum(s.routed for s in self.slots)} routed, "
                f"base '{r.base}' (width {self.width})."
            ]
        for alias, src in self.sources.items():
            lines.append(
                f"  {alias}: {src.family.name} ({src.model_type}), {src.num_layers} layers, width {src.width}, "
                f"{src.heads} heads, tokenizer {src.tokenizer_id} — {src.ref}"
            )
        for s in self.slots:
            parts = []
            for e in s.experts:
                extra = f" +{e.adapter} adapter" if e.adapter else ""
                parts.append(f"{e.name}{extra}")
            router = ""
            if s.slot.router is not None:
                router = f"  [{s.slot.router.type}" + (
                    f", top_k={s.slot.router.top_k}]" if s.slot.router.takes_top_k else "]"
                )
            lines.append(f"  slot {s.index}: {', '.join(parts)}{router}")
        mem = self.memory_estimate()
        lines.append(f"Reads {self.tensors_to_read} tensors, {_fmt_bytes(self.bytes_to_read)} from disk.")
        lines.extend(costs.summary_lines(self.flops_per_token()))
        lines.append(
            f"Trainable: {self.adapter_parameters():,} adapter + {self.router_parameters():,} router"
            + (f" + {self.stitch_parameters():,} stitch" if self.lanes else "")
            + " parameters."
        )
        lines.append(
            f"Memory estimate (fp32, 2048-token context): weights {_fmt_bytes(mem['weights'])}, "
            f"KV cache {_fmt_bytes(mem['kv_cache'])}, total {_fmt_bytes(mem['total'])}."
        )
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.name,
            "slots": len(self.slots),
            "routed_slots": sum(s.routed for s in self.slots),
            "models": {a: s.card() for a, s in self.sources.items()},
            "tensors_to_read": self.tensors_to_read,
            "bytes_to_read": self.bytes_to_read,
            "memory_estimate": self.memory_estimate(),
            "adapter_parameters": self.adapter_parameters(),
            "router_parameters": self.router_parameters(),
            "flops_per_token": self.flops_per_token(),
            "warnings": list(self.warnings),
        }


def _stitch_shape(st, target_width: int) -> str:
    """A stitch's size in the plan summary: the rank of a low-rank map, the heads and width of a cross-attention."""
    if st.type == "lowrank":
        return f", rank {st.rank}"
    if st.type == "cross-attention":
        from mol.network.modeling_mol import stitch_heads

        width = st.rank or target_width
        return f", {st.heads or stitch_heads(width)} heads, width {width}"
    return ""


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plan(recipe: Recipe, sources: dict[str, ModelSource] | None = None, policy: AccessPolicy = LOCAL) -> Plan:
    """Resolve `recipe` against its models' configs and weight headers; raise a typed error on any problem.
    Models are resolved, and their files checked, under `policy` (default: unrestricted local use); each
    source keeps it, so the build checks the files it opens against it again. `sources` already resolved are
    taken as they are."""
    search = [recipe.source_dir] if recipe.source_dir else []
    sources = dict(sources or {})
    for alias in recipe.used_aliases:
        if alias not in sources:
            sources[alias] = load_source(alias, recipe.models[alias], search, policy)
    if recipe.lanes:
        return _plan_lanes(recipe, sources, policy)
    unused = [a for a in recipe.models if a not in sources]
    warnings = [f"model '{a}' is listed but no slot uses it; it will not be loaded." for a in unused]
    base = sources[recipe.base]

    for src in sources.values():
        src.check_files()
    base.load_tokenizer()  # the build loads it: one that does not load fails here, not after the weights
    _check_tokenizers(base, sources, warnings)
    for src in sources.values():
        _check_config_matches_weights(src)

    # What is read is what the loader fills: the tensors of each part built on the meta device, each checked
    # against its header entry, so a recipe that plans also builds.
    from mol import layout

    shells = {a: _meta(s, layout.shell, s) for a, s in sources.items()}
    reads: dict[str, dict[str, TensorInfo]] = {a: {} for a in sources}
    for path in base.family.module_prefixes().values():
        module = layout.part(shells[base.alias], path)
        if module is not None:
            reads[base.alias].update(_checked_tensors(base, module, path))
    head = layout.head(base, shells[base.alias])
    if head is not None:
        reads[base.alias].update(_checked_tensors(base, *head))
    checked: set[tuple[str, int]] = set()

    slot_plans: list[SlotPlan] = []
    cache_index = 0
    for i, slot in enumerate(recipe.slots):
        experts = []
        for ref in slot.experts:
            src = sources[ref.model]
            if ref.layer >= src.num_layers:
                raise RecipeError(
                    f"slots[{i}]: '{ref}' is out of range: model '{ref.model}' has {src.num_layers} "
                    f"layers (0..{src.num_layers - 1})."
                )
            layer_tensors = _tensors_under(src, src.family.layers + f".{ref.layer}")
            if not layer_tensors:
                raise CheckpointError(
                    f"{ref.model}: the weights have no tensors for layer {ref.layer} "
                    f"('{src.family.layer_prefix(ref.layer)}*'); the checkpoint is incomplete."
                )
            if (ref.model, ref.layer) not in checked:
                checked.add((ref.model, ref.layer))
                module = _meta(src, layout.layer, src, shells[ref.model], ref.layer)
                _check_cache_keyword(module)
                reads[ref.model].update(_checked_tensors(src, module, src.family.layers + f".{ref.layer}"))
            foreign = ref.model != recipe.base
            add_pos = foreign and src.family.positions is not None
            positions = layout.part(shells[ref.model], src.family.positions) if add_pos else None
            if positions is not None:
                reads[ref.model].update(_checked_tensors(src, positions, src.family.positions))
            adapter = recipe.adapter.type if foreign else None
            experts.append(
                ExpertPlan(
                    str(ref),
                    ref.model,
                    ref.layer,
                    src.width,
                    cache_index,
                    adapter,
                    add_pos,
                    layer_window(src.config, ref.layer),
                )
            )
            cache_index += 1
        slot_plans.append(SlotPlan(i, slot, tuple(experts)))

    widths = {sources[a].width for a in recipe.used_aliases}
    if len(widths) > 1:
        warnings.append(
            "models of different widths are fused through adapters; run mol.calibrate (or train) "
            "before expecting good text from the foreign blocks."
        )
    return Plan(
        recipe=recipe,
        sources=sources,
        slots=slot_plans,
        reads={a: sorted(d.values(), key=lambda t: t.name) for a, d in reads.items() if d},
        warnings=warnings,
    )


def _plan_lanes(recipe: Recipe, sources: dict[str, ModelSource], policy: AccessPolicy) -> Plan:
    """Each lane planned as a single-stream recipe on its own base; the output mixture adds the lanes'
    next-token distributions, so every lane must share one vocabulary; stitches must name slots that exist and
    leave an order in which every lane can run."""
    lanes = {
        name: plan(recipe.lane_recipe(name, sources[spec.base].num_layers), sources, policy)
        for name, spec in recipe.lanes.items()
    }
    warnings = [w for p in lanes.values() for w in p.warnings]
    first = next(iter(lanes.values())).base
    _check_tokenizers(first, {n: p.base for n, p in lanes.items()}, warnings)
    for k, st in enumerate(recipe.stitches):
        for lane, index in ((st.source, st.after[0]), (st.target, st.after[1])):
            if index >= len(lanes[lane].slots):
                raise RecipeError(
                    f"stitches[{k}]: lane '{lane}' has {len(lanes[lane].slots)} slots (0..{len(lanes[lane].slots) - 1}); "
                    f"'after' names slot {index}."
                )
        if st.type == "cross-attention":
            width = st.rank or lanes[st.target].width
            if st.heads is not None and width % st.heads:
                raise RecipeError(
                    f"stitches[{k}]: {st.heads} heads do not divide the attention's width {width} (lane "
                    f"'{st.target}''s width unless 'rank' sets it); choose heads that divide it."
                )
    from mol.network.modeling_mol import stitch_order

    try:
        stitch_order({n: len(p.slots) for n, p in lanes.items()}, recipe.stitches)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    reads: dict[str, dict[str, TensorInfo]] = {}
    for p in lanes.values():
        for alias, infos in p.reads.items():
            reads.setdefault(alias, {}).update({t.name: t for t in infos})
    return Plan(
        recipe=recipe,
        sources=sources,
        slots=[],
        reads={a: sorted(d.values(), key=lambda t: t.name) for a, d in reads.items()},
        warnings=list(dict.fromkeys(warnings)),
        lanes=lanes,
    )


def layer_window(config, layer: int) -> int | None:
    """The sliding-window length one layer of a source attends over, as transformers applies it (None: the
    whole context): per layer where the config lists `layer_types` (Qwen2, Qwen3), else for every layer when
    `sliding_window` is set and not switched off (Mistral)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and layer_types:
        return int(window) if layer < len(layer_types) and layer_types[layer] == "sliding_attention" else None
    return None if getattr(config, "use_sliding_window", None) is False else int(window)


def _check_cache_keyword(layer) -> None:
    """The layer takes a cache keyword the network knows (a wrong one would be swallowed by **kwargs and lose
    the KV cache silently)."""
    from mol.network.modeling_mol import cache_keyword

    try:
        cache_keyword(layer)
    except TypeError as exc:
        raise UnsupportedArchitectureError(
            f"{exc} Install a transformers version in the range pinned by mol-studio."
        ) from None


def _meta(src: ModelSource, make, *args):
    """`make(*args)`, which builds parts of `src` on the meta device from its config; an error transformers
    raises there (a RoPE variant's missing factor, a size it cannot take) becomes one typed line."""
    try:
        return make(*args)
    except MolError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{src.alias}: transformers cannot build its {src.model_type} layers from config.json: "
            f"{one_line(exc, 200)}".rstrip(".")
            + "."
        ) from None


def _checked_tensors(src: ModelSource, module, prefix: str) -> dict[str, TensorInfo]:
    """The header entries of the tensors `module` (on the meta device) takes, named as the loader reads them,
    each checked against the shape and kind of dtype the config implies."""
    out = {}
    for name, want in module.state_dict().items():
        full = f"{prefix}.{name}"
        info = src.tensors.get(full)
        if info is None:
            raise CheckpointError(
                f"{src.alias}: tensor '{full}' is missing from the weights in '{src.folder}'; the "
                f"checkpoint does not match its config ({src.family.name} family)."
            )
        if info.shape != tuple(want.shape):
            raise CheckpointError(
                f"{src.alias}: tensor '{full}' has shape {list(info.shape)} but config.json implies "
                f"{list(want.shape)}; the config does not match the weights in '{src.folder}'."
            )
        if dtypes.is_float(info.dtype) != want.is_floating_point():
            kind = "a floating-point" if want.is_floating_point() else "an integer"
            raise CheckpointError(
                f"{src.alias}: tensor '{full}' has dtype {info.dtype}; the model takes {kind} tensor there."
            )
        out[full] = info
    return out


def _tensors_under(src: ModelSource, module_path: str) -> dict[str, TensorInfo]:
    prefix = module_path + "."
    return {n: t for n, t in src.tensors.items() if n.startswith(prefix)}


def _check_tokenizers(base: ModelSource, sources: dict[str, ModelSource], warnings: list[str]) -> None:
    for alias, src in sources.items():
        if src is base:
            continue
        a, b = base.tokenizer_fingerprint, src.tokenizer_fingerprint
        if a and b and a != b:
            raise IncompatibleModelsError(
                f"Tokenizers differ: base '{base.alias}' ({base.ref}, vocabulary {a}) and '{alias}' ({src.ref}, "
                f"vocabulary {b}). Blocks can only be fused between models whose vocabularies are identical; "
                "pick models that share one tokenizer."
            )
        if src.vocab_size != base.vocab_size and (not a or not b):
            raise IncompatibleModelsError(
                f"Vocabulary sizes differ: base '{base.alias}' has {base.vocab_size} ids, '{alias}' has "
                f"{src.vocab_size}; their tokenizers cannot be the same."
            )
        if not a or not b:
            warnings.append(
                f"'{alias}' or the base has no tokenizer files; vocabularies could not be compared."
            )


def _check_config_matches_weights(src: ModelSource) -> None:
    embed = src.tensors.get(src.family.embed + ".weight")
    if embed is None:
        return
    width = int(getattr(src.config, "word_embed_proj_dim", None) or src.width)
    if len(embed.shape) != 2 or embed.shape[1] != width:
        raise CheckpointError(
            f"{src.alias}: config.json says width {width} but the embedding weight has shape {list(embed.shape)}; "
            f"the config does not match the weights in '{src.folder}'."
        )
    if embed.shape[0] < src.vocab_size:
        raise CheckpointError(
            f"{src.alias}: config.json says {src.vocab_size} vocabulary ids but the embedding has {embed.shape[0]} rows."
        )
