"""The fused model: embeddings of the base, a stack of slots (each one or more expert blocks, routed), the
base's final norm and head. Reads top to bottom: FusedCache, ExpertBlock, FusedSlot, FusedModel."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mol.errors import ResourceError
from mol.routers import Routing, load_balancing_loss, z_loss
from mol.trace import SlotTrace, Trace


@dataclass
class FusedCache:
    """One KV-cache layer per slot-expert (index = ExpertPlan.cache_index), the attention mask of everything
    seen so far, and each pooled router's per-sequence decision."""

    kv: DynamicCache = field(default_factory=DynamicCache)
    mask: torch.Tensor | None = None  # [B, seen]
    pooled: dict[int, dict] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]


@dataclass
class MoLOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    cache: FusedCache | None = None
    trace: Trace | None = None
    # (slot index, routing) per routed slot, gradients attached: losses over a batch split across processes
    # (mol.train) are computed from them
    routings: list[tuple[int, Routing]] = field(default_factory=list)


@dataclass
class GenerateOutput:
    """What `generate(..., return_trace=True)` returns: the tokens, [B, T + new], and the routing trace of every
    token the model read (the prompt and each generated token fed back)."""

    sequences: torch.Tensor
    trace: Trace


@dataclass
class StepContext:
    """What every block of one forward step shares."""

    mask4d: torch.Tensor | None  # [B, 1, Q, K] additive; None: plain causal (no padding, nothing cached)
    mask2d: torch.Tensor  # [B, Q] 1 for real tokens of this step
    position_ids: torch.Tensor  # [B, Q]
    cache: FusedCache | None
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rotary_modules: nn.ModuleDict
    routings: list[tuple[int, Routing]] = field(default_factory=list)
    # Fixed shapes and no data-dependent choices (a captured CUDA graph, torch.compile): every expert of a routed
    # slot then runs on every token, and the mixing weights alone select.
    static: bool = False
    moved: dict = field(default_factory=dict)  # copies of this context on other devices (mol.placement)
    windows: dict = field(default_factory=dict)  # sliding-window length -> its additive mask (None: causal)

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
        return y.new_zeros(shape[:-1].numel(), y.shape[-1]).index_copy(0, self.rows, y).view(*shape[:-1], -1)


class ExpertBlock(nn.Module):
    """One source layer, called with its own family's keywords, positions and adapter."""

    def __init__(
        self,
        name: str,
        alias: str,
        layer: nn.Module,
        cache_keyword: str,
        takes: tuple[str, ...],
        adapter: nn.Module | None = None,
        positions: nn.Module | None = None,
        position_offset: int = 0,
        mlp: nn.Module | None = None,
        window: int | None = None,
    ):
        super().__init__()
        self.name, self.alias = name, alias
        self.window = window  # its source's sliding window for this layer (None: the whole context)
        self.layer = layer
        self.cache_keyword, self.takes = cache_keyword, takes
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
        return h + (delta if self.adapter is None else self.adapter.out(delta))


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
        if (
            self.device is not None
        ):  # every slot placed apart takes its device's copy of the step, not only the
            h, ctx = h.to(self.device), ctx.on(self.device)  # first one the stream enters there
        if self.router is None:
            return self.experts[0](h, ctx)
        state = None
        if ctx.cache is not None and self.router.kind == "pooled":
            state = ctx.cache.pooled.setdefault(self.index, {})
        routing = self.router(h, ctx.mask2d if state is None else _whole_mask(ctx), state)
        ctx.routings.append((self.index, routing))
        # Every expert of a token router sees every token, so each expert's KV cache stays whole; its MLP runs
        # only for the tokens that chose it. A pooled router with a fixed per-sequence decision runs only the
        # experts some sequence chose.
        rows = None if ctx.static else _rows_by_expert(routing.chosen, len(self.experts))
        out = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            if rows is not None and state is not None and rows[i].numel() == 0:
                continue  # a pooled decision no sequence took: the expert is never needed in this generation
            w = (routing.weights * (routing.chosen == i)).sum(-1, keepdim=True)  # [B, T, 1]
            out = torch.addcmul(out, w.to(h.dtype), expert(h, ctx, None if rows is None else rows[i]))
        return out


def _rows_by_expert(chosen: torch.Tensor, n_experts: int) -> list[torch.Tensor]:
    """Flat token indices that chose each expert ([B, T, k] choices), with one host sync for the whole slot
    (the counts) rather than one per expert: each sync stalls the GPU until the host queues work again."""
    k = chosen.shape[-1]
    expert_of = chosen.reshape(-1)
    order = torch.argsort(expert_of, stable=True)  # grouped by expert, tokens ascending within each group
    counts = torch.bincount(expert_of, minlength=n_experts).tolist()
    return list((order // k).split(counts))


def _whole_mask(ctx: StepContext) -> torch.Tensor:
    """The pooled decision is taken over every real token seen so far (the prompt, at the first step)."""
    return ctx.mask2d


class FusedModel(nn.Module):
    """A language model assembled from blocks of several source models. Build it with `mol.build(recipe)`."""

    def __init__(
        self,
        plan,
        embed: nn.Module,
        head: nn.Module,
        final_norm: nn.Module | None,
        slots: list[FusedSlot],
        rotary: dict[str, nn.Module],
        positions: nn.Module | None = None,
        position_offset: int = 0,
        project_in: nn.Module | None = None,
        project_out: nn.Module | None = None,
        tokenizer=None,
        embedding_multiplier: float = 1.0,
        logits_divisor: float = 1.0,
        placement=None,
    ):
        super().__init__()
        self.embedding_multiplier, self.logits_divisor = embedding_multiplier, logits_divisor  # the base's
        self.plan = plan
        self.recipe = plan.recipe
        self.embed, self.head, self.final_norm = embed, head, final_norm
        self.positions, self.position_offset = positions, position_offset
        self.project_in, self.project_out = project_in, project_out
        self.slots = nn.ModuleList(slots)
        self.rotary = nn.ModuleDict(rotary)
        self.tokenizer = tokenizer
        self.placement = placement  # slots spread over devices or offloaded (mol.placement); None: one device
        # mol.fast's decoders (static caches, captured graphs), most recently used last: see mol.fast.decoder_for
        self.fast_decoders: OrderedDict = OrderedDict()

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def routed_slots(self) -> list[FusedSlot]:
        return [s for s in self.slots if s.router is not None]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Adapters and routers: the only parts of a fused model that train (source blocks stay frozen)."""
        return {n: p for n, p in self.named_parameters() if ".adapter." in n or ".router." in n}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keep = (".adapter.", ".router.")
        return {n: t for n, t in self.state_dict().items() if any(k in n for k in keep)}

    def new_cache(self) -> FusedCache:
        return FusedCache()

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: FusedCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        trace: bool = True,
    ) -> MoLOutput:
        """One step over `input_ids` (after `cache`, if given). With `trace`, the output's `trace` holds the step's
        routing copied to the host (a synchronisation per routed slot, which training has no use for: it passes
        `trace=False` and reads `routings`, gradients attached)."""
        input_ids = input_ids.to(self.device)
        bsz, q = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(bsz, q, dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(self.device).long()
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.length if cache is not None else 0
        full_mask = (
            attention_mask
            if cache is None or cache.mask is None
            else torch.cat([cache.mask, attention_mask], 1)
        )
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        ctx = StepContext(
            mask4d=self._mask4d(full_mask, q),
            mask2d=attention_mask,
            position_ids=position_ids,
            cache=cache,
            rotary={},
            rotary_modules=self.rotary,
            windows=self.window_masks(full_mask, q),
        )
        logits = self.step_logits(input_ids, ctx)
        if cache is not None:
            cache.mask = full_mask

        step_trace = (
            None
            if not trace
            else Trace(
                token_ids=input_ids.detach().cpu(),
                attention_mask=attention_mask.detach().cpu(),
                slots=[
                    SlotTrace(
                        i,
                        self.slots[i].expert_names,
                        self.slots[i].router.kind,
                        r.probs.detach().float().cpu(),
                        r.chosen.detach().cpu(),
                    )
                    for i, r in ctx.routings
                ],
            )
        )
        out = MoLOutput(logits=logits, cache=cache, trace=step_trace, routings=ctx.routings)
        if ctx.routings:
            on = {
                r.probs.device: attention_mask.to(r.probs.device) for _, r in ctx.routings
            }  # slots may sit apart
            out.aux_loss = torch.stack(
                [
                    load_balancing_loss(r.probs, r.chosen, on[r.probs.device]).to(self.device)
                    for _, r in ctx.routings
                ]
            ).mean()
            out.z_loss = torch.stack(
                [z_loss(r.logits, on[r.probs.device]).to(self.device) for _, r in ctx.routings]
            ).mean()
        if labels is not None:
            shift = logits[:, :-1].float()
            target = labels[:, 1:].to(self.device)
            out.loss = nn.functional.cross_entropy(
                shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100
            )
        return out

    def step_logits(self, input_ids: torch.Tensor, ctx: StepContext, last_only: bool = False) -> torch.Tensor:
        """The network itself: embeddings, every slot, final norm and head (also the body of mol.fast's step)."""
        h = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        if self.project_in is not None:  # OPT-350m style: project first, then add positions
            h = self.project_in(h)
        if self.positions is not None:
            h = h + nn.functional.embedding(ctx.position_ids + self.position_offset, self.positions.weight)
        for slot in self.slots:
            h = slot(h, ctx)
        h = h[:, -1:].to(self.device) if last_only else h.to(self.device)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        logits = self.head(h)
        return logits if self.logits_divisor == 1.0 else logits / self.logits_divisor

    @property
    def windows(self) -> list[int]:
        """The sliding-window lengths of this model's blocks (each gets its own attention mask)."""
        return sorted({e.window for s in self.slots for e in s.experts if e.window is not None})

    def window_masks(self, full_mask: torch.Tensor, q: int) -> dict[int, torch.Tensor | None]:
        return {w: self._mask4d(full_mask, q, w) for w in self.windows}

    def _mask4d(self, full_mask: torch.Tensor, q: int, window: int | None = None) -> torch.Tensor | None:
        """Additive causal mask over every key seen so far; its key length equals each slot's cache length. With
        a sliding `window`, a query also sees only the keys less than `window` positions behind it, as
        transformers does. None when there is no padding, nothing cached and no window to cut: attention is
        then plainly causal, and SDPA can take its flash kernel (given a mask, it cannot)."""
        bsz, k = full_mask.shape
        past = k - q
        if past == 0 and q > 1 and bool(full_mask.all()) and (window is None or q <= window):
            return None
        rows = torch.arange(q, device=self.device).unsqueeze(1) + past
        cols = torch.arange(k, device=self.device).unsqueeze(0)
        seen = cols <= rows
        if window is not None:
            seen = seen & (cols > rows - window)
        allowed = seen.unsqueeze(0) & full_mask.bool().unsqueeze(1)  # [B, Q, K]
        mask = torch.zeros(bsz, 1, q, k, dtype=self.dtype, device=self.device)
        return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(self.dtype).min)

    # ---- generation --------------------------------------------------------------------------------------
    @property
    def position_limit(self) -> int | None:
        """The fewest positions any source model knows (its config's `max_position_embeddings`); None: no limit."""
        limits = [getattr(s.config, "max_position_embeddings", None) for s in self.plan.sources.values()]
        return min((n for n in limits if isinstance(n, int) and n > 0), default=None)

    def _check_positions(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt longer than the sources' positions, and a decode that would run past a learned
        position table (an index error deep inside the step otherwise)."""
        limit = self.position_limit
        if limit is not None and prompt_tokens > limit:
            raise ResourceError(
                f"The prompt is {prompt_tokens} tokens, more than the {limit} positions the recipe's models "
                "know; shorten it."
            )
        tables = [(self.positions, self.position_offset)] + [
            (e.positions, e.position_offset) for s in self.slots for e in s.experts
        ]
        sizes = [t.weight.shape[0] - offset for t, offset in tables if t is not None]
        read = prompt_tokens + max(max_new_tokens - 1, 0)  # the last new token is never fed back
        if sizes and read > min(sizes):
            raise ResourceError(
                f"The prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens runs past the "
                f"{min(sizes)} positions of the recipe's learned position table; shorten the prompt or ask "
                "for fewer new tokens."
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        stop=None,
        fast: bool | None = None,
        return_trace: bool = False,
    ) -> torch.Tensor | GenerateOutput:
        """Greedy or sampled decoding with the fused KV cache. Returns prompt + new tokens, [B, T + new], or with
        `return_trace` a GenerateOutput: those tokens (`sequences`) and the routing `trace` of the prompt and
        every generated token. Sampling applies transformers' temperature, top-k and top-p warpers, in that order.

        `streamer(new_token_ids: Tensor[B])` is called after each step; `stop()` returning True ends early. The
        fast path (mol.fast: a static cache and, on CUDA, one captured CUDA graph per step) gives the same tokens
        with far fewer launches; `fast=None` takes it when the model sits on one CUDA device, `fast=True` also on
        the CPU, `fast=False` never. A prompt longer than the sources' positions raises ResourceError."""
        input_ids = input_ids.to(self.device)
        self._check_positions(input_ids.shape[1], max_new_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).long()
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        if pad_token_id is None:
            pad_token_id = next(iter(eos), 0)
        warpers = sampling_warpers(temperature, top_k, top_p) if do_sample else None
        if fast is None:
            fast = (
                self.device.type == "cuda" and not self.training and self.placement is None and len(eos) <= 8
            )
        if fast and max_new_tokens > 0:
            from mol.fast import decoder_for

            return decoder_for(self, input_ids.shape[0], input_ids.shape[1] + max_new_tokens).generate(
                input_ids,
                attention_mask,
                max_new_tokens,
                eos,
                pad_token_id,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                streamer=streamer,
                stop=stop,
                return_trace=return_trace,
            )
        cache = self.new_cache()
        tokens, masks, traces = [input_ids], [attention_mask], []
        try:
            self._decode(
                cache,
                tokens,
                masks,
                traces if return_trace else None,
                max_new_tokens,
                eos,
                pad_token_id,
                warpers,
                generator,
                streamer,
                stop,
            )
        except torch.OutOfMemoryError:
            del cache
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceError(
                f"Out of memory on {self.device} while generating {max_new_tokens} tokens for a batch of "
                f"{input_ids.shape[0]}; use a shorter prompt, fewer new tokens or a smaller batch."
            ) from None
        sequences = torch.cat(tokens, 1)
        if not return_trace:
            return sequences
        read = input_ids.shape[1] + len(traces) - 1  # the last new token was never fed back
        trace = _join_traces(traces, sequences[:, :read], torch.cat(masks, 1)[:, :read])
        return GenerateOutput(sequences, trace)

    def _decode(
        self,
        cache,
        tokens,
        masks,
        traces,
        max_new_tokens,
        eos,
        pad_token_id,
        warpers,
        generator,
        streamer,
        stop,
    ):
        """The plain decoding loop; `traces` (None: not kept) receives each step's routing trace."""
        step_ids, step_mask = tokens[0], masks[0]
        finished = torch.zeros(step_ids.shape[0], dtype=torch.bool, device=self.device)
        eos_ids = torch.tensor(sorted(eos), device=self.device, dtype=torch.long)
        for _ in range(max_new_tokens):
            out = self.forward(step_ids, step_mask, cache=cache, trace=traces is not None)
            if traces is not None:
                traces.append(out.trace)
            nxt = next_tokens(out.logits[:, -1].float(), step_ids, warpers, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            step_mask = (~finished).long().unsqueeze(1)
            if eos:
                finished = finished | torch.isin(nxt, eos_ids)
            step_ids = nxt.unsqueeze(1)
            tokens.append(step_ids)
            masks.append(step_mask)
            if streamer is not None:
                streamer(nxt)
            if bool(finished.all()) or (stop is not None and stop()):
                break


def sampling_warpers(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> LogitsProcessorList:
    """transformers' own logits warpers for sampling, in its order: temperature, top-k, top-p (those that act)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(max(temperature, 1e-5))))
    if top_k and top_k > 0:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def next_tokens(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    warpers: LogitsProcessorList | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each sequence from its last logits, [B, vocab]: greedy when `warpers` is None, else
    sampled from the warped distribution. `input_ids` (the tokens fed last) is what the warpers are called with."""
    if warpers is None:
        return logits.argmax(-1)
    probs = warpers(input_ids, logits).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _join_traces(traces: list[Trace], token_ids: torch.Tensor, mask: torch.Tensor) -> Trace:
    """Concatenate per-step traces along the token axis (the trace covers every token the model read)."""
    if not traces:
        return Trace(token_ids=token_ids.cpu(), attention_mask=mask.cpu())
    slots = []
    for j, first in enumerate(traces[0].slots):
        probs = torch.cat([t.slots[j].probs for t in traces], 1)
        chosen = torch.cat([t.slots[j].chosen for t in traces], 1)
        slots.append(SlotTrace(first.slot, first.experts, first.router, probs, chosen))
    return Trace(token_ids=token_ids.cpu(), attention_mask=mask.cpu(), slots=slots)
