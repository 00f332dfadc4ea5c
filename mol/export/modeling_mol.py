"""MoLForCausalLM: a model fused by Mango from decoder blocks of several language models, in one readable file
that needs only torch and transformers (it is copied next to the exported weights and loaded with
`trust_remote_code=True` where Mango is not installed; `import mol` registers it so no remote code is needed).

Each source model's own decoder-layer class is instantiated from transformers with that source's config, which
the exported config carries. Reading order: adapters, routers, one expert block, one slot, the model.

    h = embed(ids) [+ base positions]
    for slot in slots:                                  # one expert: plain stacking; several: a router mixes them
        h = sum_i weight_i * expert_i(h)
    logits = head(final_norm(h))

    expert(h) = h + A_out(layer(A_in h [+ own positions]) - A_in h)   (h -> layer(h) when it runs in its own stream)
"""

import copy
import inspect

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mol import MoLConfig

# The decoder layers' cache keyword differs by family and transformers release; an unknown keyword would be
# swallowed by **kwargs and lose the KV cache silently, so it is read from each layer's signature.
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past", "past_key_value")
# transformers renamed the output's cache field (past_key_values -> cache).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_keyword(layer: nn.Module) -> str:
    params = inspect.signature(layer.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise TypeError(
        f"{type(layer).__name__}.forward takes none of {CACHE_KEYWORDS}; unsupported transformers release."
    )


def source_config(entry: dict, attn_implementation: str):
    """A source's transformers config, attention implementation set explicitly (unset, the mask comes back None
    and attention is not causal)."""
    values = dict(entry["config"])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = True
    return cfg


# ---- adapters: carry the base stream into a foreign block and its update back -------------------------------
class LinearAdapter(nn.Module):
    def __init__(self, base_width: int, block_width: int):
        super().__init__()
        self.into_block = nn.Linear(base_width, block_width)
        self.out_of_block = nn.Linear(block_width, base_width)

    def into(self, h):
        return self.into_block(h)

    def out(self, delta):
        return nn.functional.linear(delta, self.out_of_block.weight)  # a delta carries no bias


class BottleneckAdapter(nn.Module):
    def __init__(self, base_width: int, block_width: int, rank: int):
        super().__init__()
        r = min(rank, base_width, block_width)
        self.into_base = nn.Parameter(torch.zeros(block_width, base_width), requires_grad=False)
        self.into_bias = nn.Parameter(torch.zeros(block_width), requires_grad=False)
        self.out_base = nn.Parameter(torch.zeros(base_width, block_width), requires_grad=False)
        self.into_down = nn.Linear(base_width, r, bias=False)
        self.into_up = nn.Linear(r, block_width, bias=False)
        self.out_down = nn.Linear(block_width, r, bias=False)
        self.out_up = nn.Linear(r, base_width, bias=False)

    def into(self, h):
        return nn.functional.linear(h, self.into_base, self.into_bias) + self.into_up(self.into_down(h))

    def out(self, delta):
        return nn.functional.linear(delta, self.out_base) + self.out_up(self.out_down(delta))


# ---- routers: read the slot input at unit RMS, pick top-k experts --------------------------------------------
def _normalise(h):
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def _top_k(logits, k: int):
    probs = logits.softmax(-1)
    top_p, chosen = probs.topk(k, dim=-1)
    return chosen, top_p / top_p.sum(-1, keepdim=True)


class TokenRouter(nn.Module):
    kind = "token"

    def __init__(self, width: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.proj = nn.Linear(width, n_experts)

    def forward(self, h, attention_mask, state):
        return _top_k(self.proj(_normalise(h)), self.top_k)


class PooledRouter(nn.Module):
    """One decision per sequence: a causal running mean of the input without a cache; with a cache, decided
    once from the whole prompt and reused for every generated token."""

    kind = "pooled"

    def __init__(self, width: int, n_experts: int):
        super().__init__()
        self.proj = nn.Linear(width, n_experts)

    def features(self, h, attention_mask):
        x = _normalise(h)
        m = attention_mask.float()
        return (x * m.unsqueeze(-1)).cumsum(1) / m.cumsum(1).clamp(min=1).unsqueeze(-1)

    def forward(self, h, attention_mask, state):
        if state is None:
            return _top_k(self.proj(self.features(h, attention_mask)), 1)
        if "logits" not in state:
            state["logits"] = self.proj(self.features(h, attention_mask)[:, -1])
        return _top_k(state["logits"].unsqueeze(1).expand(-1, h.shape[1], -1), 1)


# ---- one forward step's shared inputs, one expert, one slot ---------------------------------------------------
class Step:
    def __init__(self, mask4d, mask2d, position_ids, cache, pooled, rotary_modules, windows=None):
        self.mask4d, self.mask2d, self.position_ids = mask4d, mask2d, position_ids
        self.windows = windows or {}  # sliding-window length -> its mask
        self.cache, self.pooled = cache, pooled
        self.rotary_modules, self.rotary = rotary_modules, {}

    def position_embeddings(self, alias: str, x):
        if alias not in self.rotary:
            self.rotary[alias] = self.rotary_modules[alias](x, self.position_ids)
        return self.rotary[alias]


class Expert(nn.Module):
    """One source layer, called with its own family's keywords, rotary module, positions and adapter."""

    def __init__(
        self,
        alias: str,
        layer: nn.Module,
        takes: list,
        adapter=None,
        positions=None,
        position_offset=0,
        window=None,
    ):
        super().__init__()
        self.alias, self.layer, self.takes = alias, layer, tuple(takes)
        self.window = window  # its source's sliding window for this layer (None: the whole context)
        self.cache_keyword = cache_keyword(layer)
        self.adapter = adapter
        self.positions = positions  # absolute-position embedding of the block's own model (foreign stream)
        self.position_offset = position_offset

    def forward(self, h, step: Step):
        x = h if self.adapter is None else self.adapter.into(h)
        if self.positions is not None:
            x = x + nn.functional.embedding(step.position_ids + self.position_offset, self.positions.weight)
        mask = step.mask4d if self.window is None else step.windows[self.window]
        kwargs = {"attention_mask": mask, "use_cache": step.cache is not None}
        if step.cache is not None:
            kwargs[self.cache_keyword] = step.cache
        if "position_ids" in self.takes:
            kwargs["position_ids"] = step.position_ids
        if "position_embeddings" in self.takes:
            kwargs["position_embeddings"] = step.position_embeddings(self.alias, x)
        y = self.layer(x, **kwargs)
        if isinstance(y, tuple):
            y = y[0]
        if self.adapter is None and self.positions is None:
            return y
        delta = y - x
        return h + (delta if self.adapter is None else self.adapter.out(delta))


class Slot(nn.Module):
    def __init__(self, index: int, experts: list, router=None):
        super().__init__()
        self.index = index
        self.experts = nn.ModuleList(experts)
        self.router = router

    def forward(self, h, step: Step):
        if self.router is None:
            return self.experts[0](h, step)
        state = None
        if step.cache is not None and self.router.kind == "pooled":
            state = step.pooled.setdefault(self.index, {})
        chosen, weights = self.router(h, step.mask2d, state)
        # Every expert of a token router sees every token so that its KV cache stays whole; a pooled router with
        # a fixed per-sequence decision runs only the experts some sequence chose.
        needed = sorted(set(chosen[:, 0, 0].tolist())) if state is not None else range(len(self.experts))
        out = torch.zeros_like(h)
        for i in needed:
            w = (weights * (chosen == i)).sum(-1, keepdim=True)
            out = torch.addcmul(out, w.to(h.dtype), self.experts[i](h, step))  # one rounding, as in Mango
        return out


# ---- the model ------------------------------------------------------------------------------------------------
class MoLPreTrainedModel(PreTrainedModel):
    config_class = MoLConfig
    base_model_prefix = "mol"
    _supports_sdpa = True
    _keep_in_fp32_modules_strict = ["router"]  # routers run in float32 whatever the model dtype, as in Mango
    # Every parameter is read from the checkpoint; transformers' own initialiser recomputes the non-persistent
    # buffers (rotary frequencies) that loading on the meta device leaves empty.

    def _init_weights(self, module):
        super()._init_weights(module)
        # A scaled embedding (Gemma) keeps its scale in a buffer that no checkpoint holds.
        if hasattr(module, "scalar_embed_scale") and isinstance(
            getattr(module, "embed_scale", None), torch.Tensor
        ):
            with torch.no_grad():
                module.embed_scale.fill_(module.scalar_embed_scale)


class MoLForCausalLM(MoLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config: MoLConfig):
        super().__init__(config)
        attn = config._attn_implementation if config._attn_implementation in ("eager", "sdpa") else "sdpa"
        configs = {alias: source_config(entry, attn) for alias, entry in config.sources.items()}
        # Each source's own model class with one layer shows which classes build its parts.
        # (Built in the dtype being loaded, not the dtype each source was saved in.)
        shells = {
            alias: AutoModelForCausalLM.from_config(_one_layer(cfg), dtype=torch.get_default_dtype())
            for alias, cfg in configs.items()
        }
        base, where = shells[config.base], config.sources[config.base]["modules"]

        def part(shell, path):
            if not path:
                return None
            try:
                mod = shell.get_submodule(path)
            except AttributeError:
                return None
            return mod if mod is not None and list(mod.state_dict()) else None

        self.embed = part(base, where["embed"])
        base_config = config.sources[config.base]["config"]  # scalars the base applies around its layers
        self.embedding_multiplier = float(
            base_config.get(where.get("embedding_multiplier") or "", None) or 1.0
        )
        self.logits_divisor = float(base_config.get(where.get("logits_divisor") or "", None) or 1.0)
        self.positions = part(base, where.get("positions"))
        self.position_offset = where.get("position_offset", 0)
        self.project_in = part(base, where.get("project_in"))
        self.project_out = part(base, where.get("project_out"))
        self.final_norm = part(base, where.get("final_norm"))
        self.head = next(m for m in (part(base, h) for h in where["head_names"]) if m is not None)
        self.rotary = nn.ModuleDict(
            {
                a: shells[a].get_submodule(s["modules"]["rotary"])
                for a, s in config.sources.items()
                if s["modules"].get("rotary")
            }
        )

        slots = []
        for index, slot in enumerate(config.slots):
            experts = []
            for e in slot["experts"]:
                src, cfg = config.sources[e["alias"]], configs[e["alias"]]
                layer_class = type(shells[e["alias"]].get_submodule(src["modules"]["layers"])[0])
                layer = layer_class(cfg, e["layer"])  # original index: some families scale by it
                for m in layer.modules():  # each expert owns its KV-cache layer
                    if hasattr(m, "layer_idx"):
                        m.layer_idx = e["cache_index"]
                adapter = None
                if e["adapter"] == "bottleneck":
                    adapter = BottleneckAdapter(
                        config.hidden_size, cfg.hidden_size, config.adapter_rank or 64
                    )
                elif e["adapter"] is not None:
                    adapter = LinearAdapter(config.hidden_size, cfg.hidden_size)
                positions = (
                    part(shells[e["alias"]], src["modules"].get("positions")) if e["add_positions"] else None
                )
                experts.append(
                    Expert(
                        e["alias"],
                        layer,
                        src["modules"]["layer_takes"],
                        adapter,
                        positions,
                        src["modules"].get("position_offset", 0),
                        e.get("window"),
                    )
                )
            router = None
            if slot.get("router"):
                r = slot["router"]
                router = (
                    PooledRouter(config.hidden_size, len(experts))
                    if r["type"] == "pooled"
                    else TokenRouter(config.hidden_size, len(experts), r.get("top_k", 1))
                )
            slots.append(Slot(index, experts, router))
        self.slots = nn.ModuleList(slots)
        del shells
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

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
        passed in): with one, a pooled router decides once from the whole prompt; without, per token from a
        causal running mean."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        device = self.embed.weight.device
        input_ids = input_ids.to(device)
        bsz, q = input_ids.shape
        state = _cache_state(cache)
        past = 0 if state is None or state["mask"] is None else state["mask"].shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(bsz, q, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device).long()
        if attention_mask.shape[1] == past + q:
            full_mask = attention_mask
        else:
            full_mask = attention_mask if past == 0 else torch.cat([state["mask"], attention_mask], 1)
        step_mask = full_mask[:, past:]
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        windows = sorted({e.window for s in self.slots for e in s.experts if e.window is not None})
        step = Step(
            self._mask4d(full_mask, q),
            step_mask,
            position_ids,
            cache,
            state["pooled"] if state is not None else {},
            self.rotary,
            {w: self._mask4d(full_mask, q, w) for w in windows},
        )

        h = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        if self.project_in is not None:  # OPT-350m style: positions live at the model width, after project_in
            h = self.project_in(h)
        if self.positions is not None:
            h = h + nn.functional.embedding(position_ids + self.position_offset, self.positions.weight)
        for slot in self.slots:
            h = slot(h, step)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.head(h)
        if self.logits_divisor != 1.0:
            logits = logits / self.logits_divisor
        if state is not None:
            state["mask"] = full_mask

        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            target = labels[:, 1:].to(device)
            loss = nn.functional.cross_entropy(
                shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache})

    def _mask4d(self, full_mask, q: int, window=None):
        """Additive causal mask over every key seen so far; its key length equals each expert's cache length.
        With a sliding `window`, a query sees only the keys less than `window` positions behind it."""
        dtype, device = self.embed.weight.dtype, full_mask.device
        bsz, k = full_mask.shape
        rows = torch.arange(q, device=device).unsqueeze(1) + (k - q)
        cols = torch.arange(k, device=device).unsqueeze(0)
        seen = cols <= rows
        if window is not None:
            seen = seen & (cols > rows - window)
        allowed = seen.unsqueeze(0) & full_mask.bool().unsqueeze(1)
        mask = torch.zeros(bsz, 1, q, k, dtype=dtype, device=device)
        return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)


def _one_layer(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.num_hidden_layers = 1
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:1]
    return cfg


def _cache_state(cache):
    """The attention mask seen so far and the pooled routers' decisions live on the cache object itself, so that
    they follow it through `generate`."""
    if cache is None:
        return None
    if not hasattr(cache, "mol_state"):
        cache.mol_state = {"mask": None, "pooled": {}}
    return cache.mol_state
