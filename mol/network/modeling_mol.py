"""The fused network: embeddings of the base, a stack of slots (each one or more expert blocks, routed), the
base's final norm and head. `mol.build` runs `MoLNetwork` (as `mol.FusedModel`); an exported routed folder
carries this very file, and `MoLForCausalLM` (below) runs the same network for transformers' `from_pretrained`
and `generate` where Mango is not installed. Needs only torch and transformers.

    h = embed(ids) [* multiplier] [+ base positions]
    for slot in slots:                                  # one expert: plain stacking; several: a router mixes them
        h = sum_i weight_i * expert_i(h)
    logits = head(final_norm(h)) [/ divisor]

    expert(h) = h + A_out(layer(A_in h [+ own positions]) - A_in h)   (h -> layer(h) when it runs in its own stream)

Each source's own decoder-layer class is instantiated from transformers with that source's config, which the
MoLConfig carries. Reading order: the step's shared inputs, one expert, one slot, the network, the HF wrapper."""

from __future__ import annotations

import copy
import inspect
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapters import make_adapter
from .attention import NAME as ATTENTION_NAME
from .configuration_mol import MoLConfig
from .fusing import DEVICES as FUSED_DEVICES
from .fusing import fuse_layer, fused_norm
from .kernels import runs_on
from .mixing import can_fuse, fused_mix, log_normaliser, mix, mix_logits
from .routers import ROUTERS, Routing, keep_state, make_router, route, unit_rms

# The decoder layers' cache keyword differs by family and transformers release (past_key_value ->
# past_key_values -> cache; GPT-NeoX layer_past). An unknown keyword would be swallowed by **kwargs and lose the
# KV cache silently, so it is read from each layer's own signature, newest name first.
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past", "past_key_value")
# transformers renamed the output's cache field (past_key_values -> cache).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ATTENTION = ("sdpa", "eager")


def cache_keyword(layer: nn.Module) -> str:
    params = inspect.signature(layer.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise TypeError(
        f"{type(layer).__name__}.forward takes none of {CACHE_KEYWORDS}; unsupported transformers release."
    )


def source_config(entry: dict, attn_implementation: str = "sdpa", layers: int | None = None):
    """A source's transformers config from the MoLConfig's copy of it, the attention implementation set
    explicitly (unset, the mask comes back None and attention is not causal); `layers` cuts it to that many."""
    values = copy.deepcopy(entry["config"])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    if layers is not None:
        cfg.num_hidden_layers = layers
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:layers]
    # SDPA, with mol's one-token grouped-query step (mol.network.attention: the cache read as it is)
    cfg._attn_implementation = ATTENTION_NAME if attn_implementation == "sdpa" else attn_implementation
    cfg.use_cache = True
    return cfg


# ---- one forward step's shared inputs -------------------------------------------------------------------------
@dataclass
class FusedCache:
    """One KV-cache layer per slot-expert (index = the expert's cache_index), the attention mask of everything
    seen so far, and each per-sequence router's decision."""

    kv: DynamicCache = field(default_factory=DynamicCache)
    mask: torch.Tensor | None = None  # [B, seen]
    pooled: dict[int, dict] = field(default_factory=dict)  # slot index (-1: the lanes' mixture) -> decision
    lanes: dict[str, FusedCache] = field(default_factory=dict)  # each lane's own caches (a lanes network)
    stitches: dict[int, dict] = field(default_factory=dict)  # stitch index -> its source keys/values so far

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]


@dataclass
class StepContext:
    """What every block of one forward step shares."""

    mask4d: torch.Tensor | None  # [B, 1, Q, K] additive; None: no padding, plainly causal or one query
    mask2d: torch.Tensor  # [B, Q] 1 for real tokens of this step
    position_ids: torch.Tensor  # [B, Q]
    cache: FusedCache | None
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rotary_modules: nn.ModuleDict
    routings: list[tuple[int, Routing]] = field(default_factory=list)
    # Fixed shapes and no data-dependent choices (a captured CUDA graph, torch.compile): every expert of a routed
    # slot then runs on every token, and the mixing weights alone select.
    static: bool = False
    moved: dict = field(default_factory=dict)  # copies of this context on other devices (slots placed apart)
    windows: dict = field(default_factory=dict)  # sliding-window length -> its additive mask (None: causal)
    lanes: dict = field(default_factory=dict)  # lane name -> its own context (a lanes network)
    mixture: Routing | None = None  # the lanes' output mixture of this step
    # lane name -> the CUDA stream its blocks run on, so that the lanes overlap on the device (None: one stream)
    lane_streams: dict | None = None

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The attention mask of a block: the step's own, or its sliding window's."""
        return self.mask4d if window is None else self.windows[window]

    def position_embeddings(self, alias: str, x: torch.Tensor):
        if alias not in self.rotary:
            self.rotary[alias] = self.rotary_modules[alias](x, self.position_ids)
        return self.rotary[alias]

    def on(self, device: torch.device) -> StepContext:
        """The same step on another device: tensors moved once per step, routings and cache shared."""
        if self.position_ids.device == device:
            return self
        if device not in self.moved:

            def move(t):
                return None if t is None else t.to(device, non_blocking=True)

            self.moved[device] = StepContext(
                move(self.mask4d),
                move(self.mask2d),
                move(self.position_ids),
                self.cache,
                {},
                self.rotary_modules,
                self.routings,
                static=self.static,
                windows={w: move(m) for w, m in self.windows.items()},
            )
        return self.moved[device]


# ---- one expert, one slot -------------------------------------------------------------------------------------
class TokenSubset:
    """Runs a layer's MLP on chosen tokens only. In a routed slot, an expert's update for a token that did not
    choose it is weighted by 0, so its MLP (most of a block's cost) need not run there; the layer's own forward
    still runs attention on every token, which keeps the expert's KV cache whole. Inserted as forward hooks on
    the MLP (its forward, parameters and names untouched): the pre-hook keeps the chosen tokens' rows, the hook
    puts the MLP's output for them back in place, zeros elsewhere. `rows` is set by the ExpertBlock for one
    call of its layer only."""

    def __init__(self, mlp: nn.Module):
        self.rows: torch.Tensor | None = None
        self.shape: torch.Size | None = None  # the MLP input's shape while a subset runs
        mlp.register_forward_pre_hook(self.select)
        mlp.register_forward_hook(self.scatter)

    def select(self, mlp: nn.Module, args: tuple):
        x = args[0]
        subset = self.rows is not None and self.rows.numel() != x.shape[:-1].numel()
        self.shape = x.shape if subset else None  # set afresh each call: a failed call leaves nothing behind
        return (x.reshape(-1, x.shape[-1])[self.rows], *args[1:]) if subset else None

    def scatter(self, mlp: nn.Module, args: tuple, y: torch.Tensor):
        if self.shape is None:
            return None
        shape, self.shape = self.shape, None
        # Put back as a gather: row r of the output reads row source[r] of [zeros; y] (0 for the tokens that did
        # not choose this expert). A scatter of y into zeros (index_copy, index_put) computes the same, but
        # inductor miscompiled it in a compiled training step on torch 2.13's CPU backend: the layer's residual
        # add after it read wrong values (tests/test_compiling.py).
        n = shape[:-1].numel()
        rows = self.rows
        source = torch.zeros(n, dtype=rows.dtype, device=rows.device).index_copy(
            0, rows, torch.arange(1, rows.numel() + 1, dtype=rows.dtype, device=rows.device)
        )
        return torch.cat([y.new_zeros(1, y.shape[-1]), y]).index_select(0, source).view(*shape[:-1], -1)


class ExpertBlock(nn.Module):
    """One source layer, called with its own family's keywords, positions and adapter."""

    def __init__(
        self,
        name: str,
        alias: str,
        layer: nn.Module,
        takes: tuple[str, ...],
        adapter: nn.Module | None = None,
        positions: nn.Module | None = None,
        position_offset: int = 0,
        mlp: nn.Module | None = None,
        window: int | None = None,
        projections: tuple[tuple[str, ...], ...] = (),
    ):
        super().__init__()
        self.name, self.alias = name, alias
        # Its projections that read one input, by group (Family.fused_projections): mol.network.fusing
        self.projections = tuple(tuple(g) for g in projections)
        self.window = window  # its source's sliding window for this layer (None: the whole context)
        self.layer = layer
        self.cache_keyword, self.takes = cache_keyword(layer), tuple(takes)
        self.adapter = adapter
        self.positions = positions  # absolute-position embedding of the block's own model (foreign stream)
        self.position_offset = position_offset
        self.mlp_tokens = TokenSubset(mlp) if mlp is not None else None  # routed slots: the family's MLP part

    def forward(self, h: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows`: flat indices of the tokens whose MLP must run (None: all)."""
        x = h if self.adapter is None else self.adapter.into(h)
        if self.positions is not None:
            x = x + nn.functional.embedding(ctx.position_ids + self.position_offset, self.positions.weight)
        kwargs = {"attention_mask": ctx.mask_for(self.window), "use_cache": ctx.cache is not None}
        if ctx.cache is not None:
            kwargs[self.cache_keyword] = ctx.cache.kv
        if "position_ids" in self.takes:
            kwargs["position_ids"] = ctx.position_ids
        if "position_embeddings" in self.takes:
            kwargs["position_embeddings"] = ctx.position_embeddings(self.alias, x)
        if self.mlp_tokens is not None:
            self.mlp_tokens.rows = rows
        try:
            y = self.layer(x, **kwargs)
        finally:
            if self.mlp_tokens is not None:
                self.mlp_tokens.rows = None
        if isinstance(y, tuple):  # older releases return (hidden, ...)
            y = y[0]
        if self.adapter is None and self.positions is None:
            return y
        delta = y - x
        return h + delta if self.adapter is None else self.adapter.add_out(h, delta)


class FusedSlot(nn.Module):
    def __init__(self, index: int, experts: list[ExpertBlock], router: nn.Module | None = None):
        super().__init__()
        self.index = index
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.device: torch.device | None = (
            None  # where it runs, when placed apart from the model (mol.placement)
        )

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def forward(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.device is not None:  # every slot placed apart takes its device's copy of the step
            h, ctx = h.to(self.device), ctx.on(self.device)
        if self.router is None:
            return self.experts[0](h, ctx)
        state = None
        if ctx.cache is not None and self.router.per_sequence:
            state = ctx.cache.pooled.setdefault(self.index, {})
        routing = route(self.router, h, ctx.mask2d, state)
        ctx.routings.append((self.index, routing))
        # Every expert of a token router sees every token, so each expert's KV cache stays whole; its MLP runs
        # only for the tokens that chose it. A per-sequence router with a fixed decision runs only the experts
        # some sequence chose.
        rows = None if ctx.static else rows_by_expert(routing.chosen, len(self.experts))
        # Each expert's mixing weight for every token, [B, T, n] (0 where it was not chosen), in a few kernels:
        # a decode step runs this in every routed slot.
        # Top-1 with no gradient wanted (generation): every weight is exactly 1, so the sum is a selection.
        select = routing.chosen.shape[-1] == 1 and not routing.weights.requires_grad
        if not select:
            weights = torch.zeros_like(routing.probs).scatter(-1, routing.chosen, routing.weights).to(h.dtype)
        out = None
        for i, expert in enumerate(self.experts):
            if rows is not None and state is not None and rows[i].numel() == 0:
                continue  # a per-sequence decision no sequence took: never needed in this generation
            y = expert(h, ctx, None if rows is None else rows[i])
            if select:
                out = y if out is None else torch.where(routing.chosen == i, y, out)
            else:
                w = weights[..., i : i + 1]
                out = y * w if out is None else torch.addcmul(out, w, y)
        return torch.zeros_like(h) if out is None else out


def rows_by_expert(chosen: torch.Tensor, n_experts: int) -> list[torch.Tensor]:
    """Flat token indices that chose each expert ([B, T, k] choices), with one host sync for the whole slot
    (the counts) rather than one per expert: each sync stalls the GPU until the host queues work again."""
    k = chosen.shape[-1]
    expert_of = chosen.reshape(-1)
    order = torch.argsort(expert_of, stable=True)  # grouped by expert, tokens ascending within each group
    counts = torch.bincount(expert_of, minlength=n_experts).tolist()
    return list((order // k).split(counts))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, labels -100 ignored."""
    shift = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return nn.functional.cross_entropy(
        shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100
    )


def fill_embed_scale(module: nn.Module) -> None:
    """A scaled embedding (Gemma) keeps sqrt(width) in a non-persistent buffer that no checkpoint holds, so a
    model loaded onto the meta device must set it again: the one place that does."""
    scale = getattr(module, "scalar_embed_scale", None)
    buffer = getattr(module, "embed_scale", None)
    if scale is None or not isinstance(buffer, torch.Tensor):
        return
    device = next((p.device for p in module.parameters()), buffer.device)
    module.register_buffer("embed_scale", torch.tensor(float(scale), device=device), persistent=False)


# ---- the network ----------------------------------------------------------------------------------------------
class MoLNetwork(nn.Module):
    """The fused stack described by a MoLConfig. Modules are built on the current default device (the meta
    device when weights are loaded into it); `init_device` is where the parts that no checkpoint holds (adapters
    and routers at their starting values, rotary frequencies) are made, None: the default device as well."""

    def __init__(
        self, config: MoLConfig, init_device: torch.device | str | None = None, slot_offset: int = 0
    ):
        super().__init__()
        self.config = config
        self.compiled_step_logits = None  # step_logits compiled (mol.compiling.compile_network); None: eager
        self.head_trained = False  # the final norm and head are trained weights too (`train_head`)
        # Whether `fuse_kernels` fuses (False: the layers stay as their families wrote them)
        self.kernel_fusion = True
        self.lanes: nn.ModuleDict | None = None
        if config.lanes:
            self._build_lanes(config, init_device)
            return
        attn = config._attn_implementation if config._attn_implementation in ATTENTION else "sdpa"
        configs = {alias: source_config(entry, attn) for alias, entry in config.sources.items()}
        # Each source's own model class with one layer: its module tree gives the classes of every part.
        shells = {
            alias: AutoModelForCausalLM.from_config(
                source_config(config.sources[alias], attn, layers=1), dtype=torch.get_default_dtype()
            )
            for alias in configs
        }
        made_here = nullcontext() if init_device is None else torch.device(init_device)
        base, where = shells[config.base], config.sources[config.base]["modules"]
        base_config = config.sources[config.base]["config"]  # scalars the base applies around its layers
        self.embedding_multiplier = float(base_config.get(where.get("embedding_multiplier") or "") or 1.0)
        self.logits_divisor = float(base_config.get(where.get("logits_divisor") or "") or 1.0)
        self.embed = _part(base, where["embed"])
        self.positions = _part(base, where.get("positions"))
        self.position_offset = where.get("position_offset", 0)
        self.project_in = _part(base, where.get("project_in"))
        self.project_out = _part(base, where.get("project_out"))
        self.final_norm = _part(base, where.get("final_norm"))
        self.head = next(m for m in (_part(base, h) for h in where["head_names"]) if m is not None)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        with made_here:
            self.rotary = nn.ModuleDict(
                {
                    a: type(shells[a].get_submodule(s["modules"]["rotary"]))(config=configs[a])
                    for a, s in config.sources.items()
                    if s["modules"].get("rotary")
                }
            )
        slots = []
        for index, slot in enumerate(config.slots):
            routed = slot.get("router") is not None
            experts = []
            for e in slot["experts"]:
                src, cfg = config.sources[e["alias"]]["modules"], configs[e["alias"]]
                layer_class = type(shells[e["alias"]].get_submodule(src["layers"])[0])
                layer = layer_class(cfg, e["layer"])  # its original index: some families scale by it
                for m in layer.modules():  # each expert owns its KV-cache layer: two sharing one corrupt it
                    if hasattr(m, "layer_idx"):
                        m.layer_idx = e["cache_index"]
                layer.requires_grad_(False)
                adapter = None
                if e["adapter"] is not None:
                    with made_here:
                        adapter = make_adapter(
                            e["adapter"], config.hidden_size, cfg.hidden_size, config.adapter_rank
                        )
                positions = _part(shells[e["alias"]], src.get("positions")) if e["add_positions"] else None
                experts.append(
                    ExpertBlock(
                        e["name"],
                        e["alias"],
                        layer,
                        src["layer_takes"],
                        adapter=adapter,
                        positions=positions,
                        position_offset=src.get("position_offset", 0),
                        mlp=layer.get_submodule(src["mlp"]) if routed and src.get("mlp") else None,
                        window=e.get("window"),
                        projections=src.get("fused_projections", ()),
                    )
                )
            router = None
            if routed:
                r = slot["router"]
                if r["type"] not in ROUTERS:
                    _import_router_code(config, r["type"])
                with made_here:
                    router = make_router(
                        r["type"], config.hidden_size, len(experts), r.get("top_k", 1)
                    ).float()
            slots.append(FusedSlot(slot_offset + index, experts, router))
        self.slots = nn.ModuleList(slots)
        for part in (
            self.embed,
            self.head,
            self.final_norm,
            self.positions,
            self.project_in,
            self.project_out,
        ):
            if part is not None:
                part.requires_grad_(False)
        for slot in self.slots:
            for e in slot.experts:
                if e.positions is not None:
                    e.positions.requires_grad_(False)

    # ---- properties -------------------------------------------------------------------------------------
    def _build_lanes(self, config: MoLConfig, init_device) -> None:
        """Each lane a one-stream network of its own (its slots numbered after the previous lanes', so every slot
        of the model has one index); stitches between them; a gate over their next-token distributions."""
        lanes, offset = {}, 0
        for name, fields in config.lanes.items():
            sub = MoLConfig(**fields)
            sub._attn_implementation = config._attn_implementation
            lanes[name] = MoLNetwork(sub, init_device, slot_offset=offset)
            offset += len(fields["slots"])
        self.lanes = nn.ModuleDict(lanes)
        widths = {name: lane.config.hidden_size for name, lane in lanes.items()}
        made_here = nullcontext() if init_device is None else torch.device(init_device)
        with made_here:
            self.stitches = nn.ModuleList(
                make_stitch(st, widths[st["from"]], widths[st["to"]]) for st in config.stitches
            )
            mixture = (config.mixture or {}).get("type", "token")
            kind = {"sequence": "pooled", "evidence": "evidence"}.get(mixture, "token")
            self.gate = make_router(kind, sum(widths.values()), len(lanes)).float()
        self.order = stitch_order({n: len(lane.slots) for n, lane in lanes.items()}, self.stitches)
        self.slots = nn.ModuleList()  # the lanes hold the slots

    @property
    def device(self) -> torch.device:
        return next(iter(self.lanes.values())).device if self.lanes is not None else self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.lanes.values())).dtype if self.lanes is not None else self.embed.weight.dtype

    @property
    def all_slots(self) -> list[FusedSlot]:
        """Every slot of the model, lanes' included, in index order."""
        if self.lanes is None:
            return list(self.slots)
        return [s for lane in self.lanes.values() for s in lane.slots]

    @property
    def routed_slots(self) -> list[FusedSlot]:
        return [s for s in self.all_slots if s.router is not None]

    @property
    def windows(self) -> list[int]:
        """The sliding-window lengths of this model's blocks (each gets its own attention mask)."""
        return sorted({e.window for s in self.all_slots for e in s.experts if e.window is not None})

    def fuse_kernels(self, devices: tuple[str, ...] = FUSED_DEVICES) -> None:
        """Run each source layer's projections of one input as one matrix product, its RMSNorms as one kernel,
        and its Llama-form attention's rotary embedding and cache write and its MLP's activation as one kernel
        each (mol.network.fusing), for the layers on a device of a type in `devices` (CUDA: on the CPU it does not
        pay), unless `kernel_fusion` is off: same tensors and memory, outputs as before to rounding. Layers fused
        already are skipped, so building, a fast decoder and the plain `generate` each call it (a model moved to a GPU
        after building is fused at its first `generate`)."""
        if not self.kernel_fusion:
            return
        for slot in self.all_slots:
            for e in slot.experts:
                fuse_layer(e.layer, e.projections, devices)
        for net in self.lanes.values() if self.lanes is not None else [self]:
            if net.final_norm is not None:
                net.final_norm = fused_norm(net.final_norm, devices)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Adapters, routers, stitches and the lanes' gate: the only parts of a fused model that train (source
        blocks stay frozen); and the final norm and head once `train_head` has made them trained weights."""
        return {n: p for n, p in self.named_parameters() if self._trains(n)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.state_dict().items() if self._trains(n)}

    def _trains(self, name: str) -> bool:
        return _trainable(name) or (self.head_trained and _head_part(name))

    def head_names(self) -> set[str]:
        """The state names of the final norm and head (every lane's), trained weights after `train_head`."""
        return {n for n in self.state_dict() if _head_part(n)}

    def train_head(self, requires_grad: bool = True) -> None:
        """Make the final norm and head (every lane's) trained weights: saved, loaded and exported with the
        adapters and routers, and trained where `requires_grad`. A head tied to the input embedding is untied
        first (it gets a copy of its own), so training it never changes the embedding. Parts still on the meta
        device (an export's trainable parts, which read nothing) are made on the CPU, to be set from weights."""
        self.head_trained = True
        for net in self.lanes.values() if self.lanes is not None else [self]:
            net.head_trained = True
            if net.head.weight is net.embed.weight:
                net.head.weight = nn.Parameter(net.embed.weight.detach().clone())
            for part in (net.head, net.final_norm):
                if part is None:
                    continue
                if any(t.is_meta for t in part.state_dict().values()):
                    part.to_empty(device="cpu")
                part.requires_grad_(requires_grad)

    def adapters(self) -> dict[str, nn.Module]:
        """Expert path -> adapter, for every expert that has one."""
        if self.lanes is not None:
            return {f"lanes.{n}.{k}": a for n, lane in self.lanes.items() for k, a in lane.adapters().items()}
        return {
            f"slots.{j_slot}.experts.{j}": e.adapter
            for j_slot, s in enumerate(self.slots)
            for j, e in enumerate(s.experts)
            if e.adapter is not None
        }

    def new_cache(self) -> FusedCache:
        return FusedCache()

    # ---- forward -----------------------------------------------------------------------------------------
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: FusedCache | None,
        dense: bool | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, StepContext]:
        """One step over `input_ids` [B, Q] after what `cache` has seen; `attention_mask` [B, Q] covers the new
        tokens. Positions count the real tokens seen so far. Returns the logits and the step's context (its
        routings). `dense`: the caller knows that every token, cached and new, is real (True) or not (False), so
        a decode step needs no attention mask and no host read of the mask to find that out (see `_mask4d`);
        None: the mask is read where that matters. `last_only`: the logits of the last position only."""
        q = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        full_mask = attention_mask if past == 0 else torch.cat([cache.mask, attention_mask], 1)
        ctx = self.context(full_mask, q, attention_mask, cache, dense)
        run = self.compiled_step_logits or self.step_logits
        logits = run(input_ids, ctx, last_only=True) if last_only else run(input_ids, ctx)
        if cache is not None:
            cache.mask = full_mask
        return logits, ctx

    def context(
        self, full_mask: torch.Tensor, q: int, attention_mask: torch.Tensor, cache, dense: bool | None = None
    ) -> StepContext:
        """The shared inputs of one step over `q` new tokens, `full_mask` covering every token seen; a lanes
        network gives each lane its own context (its cache, rotary modules and masks). `dense` as in `step`."""
        bsz, k = full_mask.shape
        if dense is None and k == q and q > 1:  # a prompt: one host read for every mask of the step
            dense = bool(full_mask.all())
        if dense:  # every token real: positions count from the cache's length, no cumulative sum to run
            position_ids = torch.arange(k - q, k, device=full_mask.device).expand(bsz, q)
        else:
            position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, k - q :]
        ctx = StepContext(
            mask4d=None if self.lanes is not None else self._mask4d(full_mask, q, dense=dense),
            mask2d=attention_mask,
            position_ids=position_ids,
            cache=cache,
            rotary={},
            rotary_modules=self.rotary if self.lanes is None else nn.ModuleDict(),
            windows={} if self.lanes is not None else self.window_masks(full_mask, q, dense),
        )
        if self.lanes is not None:

            def lane_context(name, lane):
                lane_cache = None if cache is None else cache.lanes.setdefault(name, FusedCache())
                return lane.context(full_mask, q, attention_mask, lane_cache, dense)

            self.add_lane_contexts(ctx, lane_context)
            if not torch.is_grad_enabled():  # training keeps one stream: autograd's order stays plain
                ctx.lane_streams = self.lane_streams()
        return ctx

    def add_lane_contexts(self, ctx: StepContext, lane_context) -> StepContext:
        """Give a lanes network's step context each lane's own, `lane_context(name, lane)`; they share the step's
        one list of routings."""
        for name, lane in self.lanes.items():
            sub = lane_context(name, lane)
            sub.routings = ctx.routings  # one list for the whole model
            ctx.lanes[name] = sub
        return ctx

    def lane_streams(self) -> dict | None:
        """One CUDA stream per lane (made once), where every lane and slot sits on one CUDA device: inference
        runs the lanes on them side by side, so one lane's small kernels fill the gaps of the other's. None where
        there is nothing to overlap."""
        if self.lanes is None or len(self.lanes) < 2 or any(s.device is not None for s in self.all_slots):
            return None
        devices = {lane.device for lane in self.lanes.values()}
        device = next(iter(devices))
        if len(devices) != 1 or device.type != "cuda":
            return None
        made = _LANE_STREAMS.get(self)
        if made is None or made[0] != device:
            made = _LANE_STREAMS[self] = (device, {n: torch.cuda.Stream(device) for n in self.lanes})
        return made[1]

    def step_logits(self, input_ids: torch.Tensor, ctx: StepContext, last_only: bool = False) -> torch.Tensor:
        """The network itself: embeddings, every slot, final norm and head (also the body of mol.fast's step).
        A lanes network returns the log-probabilities of its output mixture."""
        if self.lanes is not None:
            return self._mixture_logits(input_ids, ctx, last_only)
        h = self.embed_tokens(input_ids, ctx)
        for slot in self.slots:
            h = slot(h, ctx)
        return self.readout(self.final_states(h, last_only))

    def embed_tokens(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        if self.project_in is not None:  # OPT-350m style: project first, then add positions
            h = self.project_in(h)
        if self.positions is not None:
            h = h + nn.functional.embedding(ctx.position_ids + self.position_offset, self.positions.weight)
        return h

    def final_states(self, h: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        h = h[:, -1:].to(self.device) if last_only else h.to(self.device)
        return h if self.final_norm is None else self.final_norm(h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        if self.project_out is not None:
            h = self.project_out(h)
        logits = self.head(h)
        return logits if self.logits_divisor == 1.0 else logits / self.logits_divisor

    # ---- lanes -------------------------------------------------------------------------------------------
    def _mixture_logits(self, input_ids: torch.Tensor, ctx: StepContext, last_only: bool) -> torch.Tensor:
        """Run the lanes (in the order the stitches allow), then mix their next-token distributions:
        log p(x) = log sum_l g_l p_l(x), the gate g read from the lanes' final states. A per-sequence gate decided
        from the prompt picks one lane per sequence, and only the lanes some sequence picked run after it."""
        names = list(self.lanes)
        reads_evidence = getattr(self.gate, "reads", "states") == "evidence"
        state = None
        if ctx.cache is not None and (self.gate.per_sequence or reads_evidence):
            state = ctx.cache.pooled.setdefault(-1, {})
        decided = self.gate.per_sequence and state is not None and "logits" in state
        run = None
        if (
            decided and not ctx.static
        ):  # (a captured step reads nothing back: every lane runs, weights select)
            run = _with_sources({names[i] for i in state["logits"].argmax(-1).tolist()}, self.stitches)
        # Every lane's distribution mixed, where mol.network.mixing's kernels run: the lanes' raw logits, mixed
        # in one kernel (no log-softmax over every position written out).
        mixes_all = not self.gate.per_sequence or state is None
        raw = mixes_all and runs_on(self.device)
        finals, lane_out = self.run_lanes(input_ids, ctx, run, raw=raw)  # log-probabilities, or logits
        if decided:
            scores = state["logits"].unsqueeze(1).expand(-1, input_ids.shape[1], -1)
        elif reads_evidence:
            evidence = self.lane_evidence(input_ids, lane_out, ctx.mask2d, state, raw)
            scores = self.gate(evidence, ctx.mask2d, state)
        else:  # every position: a per-sequence gate reads the whole prompt
            scores = self.gate(self.gate_input(finals), ctx.mask2d, state)
        ctx.mixture = _routing(scores)  # every position's, as the slots' routings
        chosen = ctx.mixture.chosen[..., 0]
        if last_only:
            scores, chosen = scores[:, -1:], chosen[:, -1:]
            lane_out = {n: v[:, -1:] for n, v in lane_out.items()}
        if mixes_all and raw:  # (torch's operations where the lanes sit on several devices)
            logits = [lane_out[n] for n in names]
            return fused_mix(logits, scores) if can_fuse(logits) else mix_logits(logits, scores)
        if mixes_all:
            return mix(lane_out, scores, names)
        out = None  # generating, one lane per sequence: its distribution alone
        for i, n in enumerate(names):
            if n in lane_out:
                pick = (chosen == i).unsqueeze(-1)  # [B, T, 1]
                fill = out if out is not None else torch.full_like(lane_out[n], -1e30)
                out = torch.where(pick, lane_out[n], fill)
        return out

    def lane_token_logp(self, input_ids: torch.Tensor, logp: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each lane's log-probability of each next token of `input_ids`: [B, T - 1, lanes], in lane order."""
        target = input_ids[:, 1:, None].to(logp[next(iter(self.lanes))].device)
        return torch.stack([logp[n][:, :-1].gather(-1, target).squeeze(-1) for n in self.lanes], -1)

    def lane_evidence(
        self,
        input_ids: torch.Tensor,
        logp: dict[str, torch.Tensor],
        mask: torch.Tensor,
        state: dict | None,
        raw: bool = False,
    ) -> torch.Tensor:
        """Each lane's log-probability of every input token, [B, Q, lanes]: token t's under the lane's prediction
        at t - 1 (this step's, or while generating the previous step's last, kept in `state`); 0 where no real
        token came before. Detached: it tells the gate which lane predicts well, and trains nothing upstream.
        `raw`: `logp` holds the lanes' logits, less each row's log-normaliser for their log-probabilities."""
        names = list(self.lanes)
        ids = input_ids.to(logp[names[0]].device)
        m = mask.to(ids.device).float()
        token_logp = self.lane_token_logp(ids, logp).float()  # [B, Q - 1, lanes]
        last = torch.stack([logp[n][:, -1].float() for n in names], 1)  # [B, lanes, V]: for the next step
        if raw:
            norms = torch.stack([log_normaliser(logp[n]).to(ids.device) for n in names], -1)  # [B, Q, lanes]
            token_logp, last = token_logp - norms[:, :-1], last - norms[:, -1, :, None]
        rest = token_logp * m[:, :-1, None]  # after padding: nothing predicted this one
        if state is not None and "last_logp" in state:
            kept = state["last_logp"]  # [B, lanes, V]
            first = kept.gather(-1, ids[:, :1, None].expand(-1, len(names), 1)).squeeze(-1).unsqueeze(1)
        else:
            first = torch.zeros(ids.shape[0], 1, len(names), device=ids.device)
        if state is not None:
            keep_state(state, "last_logp", last.detach())
        return torch.cat([first.to(rest.dtype), rest], 1).detach()

    def gate_input(self, finals: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the gate reads: every lane's final state at unit RMS, side by side."""
        device = next(iter(finals.values())).device
        return torch.cat([unit_rms(finals[n]).to(device) for n in self.lanes], -1)

    def run_lanes(
        self, input_ids: torch.Tensor, ctx: StepContext, run: set[str] | None = None, raw: bool = False
    ):
        """The lanes in `run` (None: all), in the order the stitches allow: each lane's final states (after its
        final norm) and next-token log-probabilities (float32; with `raw`, its logits as the head made them), by
        lane name."""
        run = set(self.lanes) if run is None else run
        streams = ctx.lane_streams or {}
        if streams:  # each lane's work on its own stream, after what the step queued so far
            main = torch.cuda.current_stream(self.device)
            for n in run:
                streams[n].wait_stream(main)

        def on(name):
            return torch.cuda.stream(streams[name]) if streams else nullcontext()

        hs = {}
        for n in self.lanes:
            if n in run:
                with on(n):
                    hs[n] = self.lanes[n].embed_tokens(input_ids, ctx.lanes[n])
        finals, logp, saved = {}, {}, {}
        sources = {(st.source, st.after[0]) for st in self.stitches}
        for name, step in self.order:
            if name not in run:
                continue
            lane = self.lanes[name]
            with on(name):
                for i, st in enumerate(self.stitches):
                    if st.target == name and st.after[1] + 1 == step:
                        if streams:  # the source lane's state must be there first
                            streams[name].wait_stream(streams[st.source])
                        state = None if ctx.cache is None else ctx.cache.stitches.setdefault(i, {})
                        update = st(saved[st.source, st.after[0]], hs[name], ctx.mask2d, state)
                        hs[name] = hs[name] + update.to(hs[name].dtype)
                if step < len(lane.slots):
                    hs[name] = lane.slots[step](hs[name], ctx.lanes[name])
                    if (name, step) in sources:
                        saved[name, step] = hs[name]
                else:
                    finals[name] = lane.final_states(hs[name])
                    logits = lane.readout(finals[name])
                    logp[name] = logits if raw else logits.log_softmax(-1, dtype=torch.float32)
        if streams:  # the mixture reads every lane
            for n in run:
                main.wait_stream(streams[n])
        return finals, logp

    def window_masks(
        self, full_mask: torch.Tensor, q: int, dense: bool | None = None
    ) -> dict[int, torch.Tensor | None]:
        return {w: self._mask4d(full_mask, q, w, dense) for w in self.windows}

    def _mask4d(
        self, full_mask: torch.Tensor, q: int, window: int | None = None, dense: bool | None = None
    ) -> torch.Tensor | None:
        """Additive causal mask over every key seen so far; its key length equals each slot's cache length. With
        a sliding `window`, a query also sees only the keys less than `window` positions behind it, as
        transformers does. None when there is no padding and no window to cut, and either nothing is cached
        (attention is then plainly causal) or, under SDPA on an accelerator, the step is one token with the
        caller saying that every token is real (`dense`; it then sees every key), as transformers does: SDPA can
        then take its flash kernel (given a mask, it cannot) and grouped-query attention without repeating keys.
        Elsewhere such a step's mask is all zeros, made in one op. `dense` None: read from `full_mask` for a
        prompt (a host sync); a one-token step then builds its mask in full."""
        bsz, k = full_mask.shape
        past = k - q
        # The network's blocks run eager or SDPA attention (see __init__). On the CPU a one-token step keeps a
        # mask: its masked path (mol.network.attention) ran faster there than grouped SDPA without one.
        sdpa = self.config._attn_implementation != "eager" and full_mask.device.type != "cpu"
        plain = (past == 0 and q > 1) or (q == 1 and past > 0)
        if plain and (window is None or k <= window):
            if dense is None and past == 0:
                dense = bool(full_mask.all())
            if dense and (past == 0 or sdpa):
                return None
            if dense:  # one query that sees every key: the mask built below would be these very zeros
                return torch.zeros(bsz, 1, 1, k, dtype=self.dtype, device=full_mask.device)
        device = full_mask.device
        rows = torch.arange(q, device=device).unsqueeze(1) + past
        cols = torch.arange(k, device=device).unsqueeze(0)
        seen = cols <= rows
        if window is not None:
            seen = seen & (cols > rows - window)
        allowed = seen.unsqueeze(0) & full_mask.bool().unsqueeze(1)  # [B, Q, K]
        mask = torch.zeros(bsz, 1, q, k, dtype=self.dtype, device=device)
        return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(self.dtype).min)


# network -> (device, lane name -> stream): kept beside the modules, which copy and pickle without them
_LANE_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Stitch(nn.Module):
    """A gated adapter: lane `source`'s state (at unit RMS) mapped into lane `target`'s width and added to its
    stream, scaled by tanh(gate); the gate starts at 0, so an untrained stitch changes nothing (as CALM and BTS
    join frozen models). `update` is the map's output before the gate (what a closed-form fit matches)."""

    def __init__(self, spec: dict, source_width: int, target_width: int):
        super().__init__()
        self.source, self.target, self.after = spec["from"], spec["to"], tuple(spec["after"])
        self.gate = nn.Parameter(torch.zeros(()))
        if spec.get("type", "linear") == "lowrank":
            rank = spec.get("rank") or 64
            self.map = nn.Sequential(
                nn.Linear(source_width, rank, bias=False), nn.Linear(rank, target_width, bias=False)
            )
        else:
            self.map = nn.Linear(source_width, target_width, bias=False)

    def update(self, h_source: torch.Tensor, h_target=None, mask=None, state=None) -> torch.Tensor:
        return self.map(unit_rms(h_source).to(next(self.map.parameters()).dtype))

    def forward(self, h_source: torch.Tensor, h_target=None, mask=None, state=None) -> torch.Tensor:
        x = self.update(h_source, h_target, mask, state)
        return torch.tanh(self.gate).to(x.dtype) * x


class CrossAttentionStitch(nn.Module):
    """A gated cross-attention from one lane into another (CALM): the target lane's state (at unit RMS) queries
    the source lane's states (at unit RMS) at every real position up to its own; the attended values, projected
    into the target's width, are added scaled by tanh(gate), zero at start. `width` (the recipe's rank; default
    the target's width) is split over `heads`. While generating, `state` (this stitch's entry in the FusedCache)
    keeps the source's keys and values of earlier tokens and their padding mask, so a step sees them all."""

    def __init__(self, spec: dict, source_width: int, target_width: int):
        super().__init__()
        self.source, self.target, self.after = spec["from"], spec["to"], tuple(spec["after"])
        self.gate = nn.Parameter(torch.zeros(()))
        width = spec.get("rank") or target_width
        self.heads = spec.get("heads") or stitch_heads(width)
        if width % self.heads:
            raise ValueError(
                f"A cross-attention stitch of width {width} cannot split into {self.heads} heads."
            )
        self.query = nn.Linear(target_width, width, bias=False)
        self.key = nn.Linear(source_width, width, bias=False)
        self.value = nn.Linear(source_width, width, bias=False)
        self.out = nn.Linear(width, target_width, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, width] -> [B, heads, T, width / heads]
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def _inputs(self, h_source, h_target, mask, state):
        """Queries, keys, values and the mask [B, 1, Q, K] of who sees whom (a query with no real key yet, as
        left padding is, is given key 0 so attention stays finite; `seen` [B, Q, 1] then zeroes its output)."""
        dtype = self.out.weight.dtype
        x = unit_rms(h_source).to(dtype)
        q = self._split(self.query(unit_rms(h_target).to(dtype)))
        k, v, keep = self._split(self.key(x)), self._split(self.value(x)), mask.bool()
        if state is not None:
            if "keys" in state:
                k, v = torch.cat([state["keys"], k], 2), torch.cat([state["values"], v], 2)
                keep = torch.cat([state["mask"], keep], 1)
            state.update(keys=k, values=v, mask=keep)
        n_q, n_k = q.shape[2], k.shape[2]
        rows = torch.arange(n_q, device=q.device).unsqueeze(1) + (n_k - n_q)
        cols = torch.arange(n_k, device=q.device).unsqueeze(0)
        allowed = (cols <= rows).unsqueeze(0) & keep.unsqueeze(1)  # [B, Q, K]
        seen = allowed.any(-1, keepdim=True)
        allowed = allowed | (~seen & (cols == 0))
        return q, k, v, allowed.unsqueeze(1), seen

    def update(self, h_source: torch.Tensor, h_target: torch.Tensor, mask: torch.Tensor, state=None):
        q, k, v, allowed, seen = self._inputs(h_source, h_target, mask, state)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return self.out(y) * seen.to(y.dtype)

    def attention(self, h_source: torch.Tensor, h_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention probabilities [B, heads, Q, K] of a step with nothing cached (what a closed-form fit of
        the value and output maps reads)."""
        q, k, _, allowed, seen = self._inputs(h_source, h_target, mask, None)
        scores = (q @ k.transpose(-1, -2)).float() / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return probs * seen.unsqueeze(1)

    def forward(self, h_source: torch.Tensor, h_target: torch.Tensor, mask: torch.Tensor, state=None):
        x = self.update(h_source, h_target, mask, state)
        return torch.tanh(self.gate).to(x.dtype) * x


def stitch_heads(width: int) -> int:
    """A cross-attention stitch's default number of heads: about one per 64 channels, dividing `width`."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def make_stitch(spec: dict, source_width: int, target_width: int) -> nn.Module:
    if spec.get("type") == "cross-attention":
        return CrossAttentionStitch(spec, source_width, target_width)
    return Stitch(spec, source_width, target_width)


def stitch_order(lengths: dict[str, int], stitches) -> list[tuple[str, int]]:
    """An order in which to run the lanes so that every stitch's source state exists before its target needs
    it: [(lane, step), ...], step i < n the lane's slot i and step n its readout. Raises ValueError where the
    stitches wait on each other in a circle."""
    needs: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for st in stitches:  # the target's step after[1] + 1 runs only once the source ran its slot after[0]
        src, dst = (st["from"], st["to"]) if isinstance(st, dict) else (st.source, st.target)
        after = tuple(st["after"]) if isinstance(st, dict) else tuple(st.after)
        needs.setdefault((dst, after[1] + 1), []).append((src, after[0]))
    done = {lane: 0 for lane in lengths}
    order: list[tuple[str, int]] = []
    while any(done[lane] <= n for lane, n in lengths.items()):
        moved = False
        for lane, n in lengths.items():
            while done[lane] <= n and all(done[src] > i for src, i in needs.get((lane, done[lane]), [])):
                order.append((lane, done[lane]))
                done[lane] += 1
                moved = True
        if not moved:
            raise ValueError("The stitches wait on each other in a circle; no lane can run first.")
    return order


def _with_sources(lanes: set[str], stitches) -> set[str]:
    """`lanes` and every lane a stitch into them reads from, transitively."""
    out, grew = set(lanes), True
    while grew:
        grew = False
        for st in stitches:
            if st.target in out and st.source not in out:
                out.add(st.source)
                grew = True
    return out


def _routing(scores: torch.Tensor) -> Routing:
    probs = scores.float().softmax(-1)
    top, chosen = probs.max(-1, keepdim=True)
    return Routing(probs, chosen, torch.ones_like(top), scores)


def _trainable(name: str) -> bool:
    """Adapters, routers, stitches and the lanes' gate train; everything read from the sources stays frozen (but
    for the final norm and head, where a model is told to train them: `MoLNetwork.train_head`)."""
    parts = name.split(".")
    return "adapter" in parts or "router" in parts or parts[0] in ("gate", "stitches")


def _head_part(name: str) -> bool:
    """A tensor of the base's final norm or head (a lane's: `lanes.<name>.head...`)."""
    parts = name.split(".")
    if parts[0] == "lanes" and len(parts) > 2:
        parts = parts[2:]
    return parts[0] in ("head", "final_norm")


def _part(shell: nn.Module, path: str | None) -> nn.Module | None:
    """The shell's module at `path`; None where this model has none, or it holds no tensors."""
    if not path:
        return None
    try:
        module = shell.get_submodule(path)
    except AttributeError:
        return None
    return module if module is not None and list(module.state_dict()) else None


def _import_router_code(config: MoLConfig, kind: str) -> None:
    """A router kind defined outside this package travels with an export as its own file (config.router_code:
    kind -> "module.Class"); importing it registers it."""
    ref = (config.router_code or {}).get(kind)
    if ref is None:
        raise KeyError(f"Router type '{kind}' is not one of: {', '.join(sorted(ROUTERS))}.")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module(ref, config._name_or_path)
    ROUTERS.setdefault(kind, cls)


# ---- transformers' view: PreTrainedModel + GenerationMixin around the same network -----------------------------
class MoLCache(DynamicCache):
    """transformers' dynamic cache, holding the fused model's own state beside the keys and values: the mask of
    everything seen so far and the per-sequence routers' decisions (they follow the cache through `generate`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = FusedCache(kv=self)


class MoLPreTrainedModel(PreTrainedModel):
    config_class = MoLConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _keep_in_fp32_modules_strict = ["router"]  # routers run in float32 whatever the model dtype, as in Mango
    # Every parameter is read from the checkpoint; transformers' own initialiser recomputes the non-persistent
    # buffers (rotary frequencies) that loading on the meta device leaves empty.

    def _init_weights(self, module):
        super()._init_weights(module)
        fill_embed_scale(module)


class MoLForCausalLM(MoLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: MoLConfig):
        super().__init__(config)
        self.model = MoLNetwork(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value):
        self.model.head = value

    def forward(
        self,
        input_ids,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        """`attention_mask` covers the cached tokens and the new ones (or only the new ones); positions come
        from it, as in the fused runtime. As there, a cache is made only when asked for (`use_cache=True` or one
        passed in): with one, a per-sequence router decides once from the whole prompt; without, per token from
        a causal running mean."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MoLCache):
            if cache.get_seq_length() > 0:
                raise ValueError("MoLForCausalLM continues only a MoLCache it returned itself.")
            cache = None  # generate's fresh DynamicCache: replaced by ours, which it then carries
        if cache is None and (use_cache or past_key_values is not None):
            cache = MoLCache()
        net = self.model
        input_ids = input_ids.to(net.device)
        q = input_ids.shape[1]
        state = cache.fused if cache is not None else None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(net.device).long()
        if state is not None and attention_mask.shape[1] == state.length + q:
            attention_mask = attention_mask[
                :, state.length :
            ]  # generate passes the mask of every token so far
        logits, _ = net.step(input_ids, attention_mask, state)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None if labels is None else lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache})
