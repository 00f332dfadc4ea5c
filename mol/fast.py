"""Fast decoding: a static KV cache, fixed step buffers and, on CUDA, one captured CUDA graph per step.

The plain path (`FusedModel.generate`) runs each new token as Python: masks rebuilt, caches grown, some forty
kernels a layer launched one at a time. At small batch sizes that is launch-bound: the GPU waits for the CPU.
Here every slot-expert's keys and values live in a buffer of fixed capacity, every per-step input (the token,
its position, the attention mask) in a fixed tensor, so one whole step (embeddings, every slot, head, greedy
pick, bookkeeping) is captured once as a CUDA graph and replayed with a single launch per token. With
`compile=True` the step is first compiled (torch.compile), which fuses the elementwise kernels between the
matrix products; the compiler's results persist on disk (mol.compiling.use_compile_cache), so a new process pays
a fraction of the first compilation.

    tokens = model.generate(ids, max_new_tokens=256, fast=True)          # decoders are cached per shape
    dec = FastDecoder(model, batch_size=8, capacity=512, compile=True)   # or hold one yourself
    tokens = dec.generate(ids, max_new_tokens=256)
    FastDecoder(model, 8, 512, compile=True, tune=False)   # no kernel tuning: a quicker first compilation

A lanes model decodes here too: each lane has its own static caches, and on CUDA its own stream, so that in the
captured graph the lanes run side by side (bench/README.md: a two-lane step takes 0.7x its lanes' steps added).

The prompt runs once through the ordinary forward (writing the static cache); only the one-token steps are
captured. In a captured step every expert of a routed slot runs on every token (no data-dependent choice can
sit in a graph) and the mixing weights alone select, so the tokens are the same as the plain path's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mol.errors import ResourceError
from mol.fused import FusedCache, FusedModel, GenerateOutput, StepContext, next_tokens, sampling_warpers
from mol.network.routers import keep_state
from mol.trace import SlotTrace, Trace

_KEEP = 2  # decoders kept per model (each holds its cache buffers and graph)


class StaticKV:
    """A transformers cache with fixed buffers: layer i's keys and values are [B, heads, capacity, head_dim],
    written in place at the positions `write`. It answers `update`, the one call attention layers make, and
    `static_buffers` for the layers that write them themselves (mol.network.rotary)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write: torch.Tensor | None = None  # positions this step writes, [Q]
        self.visible = capacity  # keys handed to attention: the prompt's length while the prompt runs

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(b, h, self.capacity, d)
            self.values[layer_idx] = value_states.new_zeros(
                b, value_states.shape[1], self.capacity, value_states.shape[-1]
            )
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.write, key_states)
        v.index_copy_(2, self.write, value_states)
        return k[:, :, : self.visible], v[:, :, : self.visible]

    def static_buffers(self, layer_idx: int, values: torch.Tensor, key_dtype: torch.dtype):
        """Layer `layer_idx`'s key and value buffers (made on first use, for values like `values`, [B, T, heads,
        D], and keys of `key_dtype`), for an attention layer that writes them itself at the positions `write`
        (mol.network.rotary) and reads the first `visible`."""
        if layer_idx not in self.keys:
            b, _, h, d = values.shape
            self.keys[layer_idx] = values.new_zeros(b, h, self.capacity, d, dtype=key_dtype)
            self.values[layer_idx] = values.new_zeros(b, h, self.capacity, d)
        return self.keys[layer_idx], self.values[layer_idx]


class FastDecoder:
    """Decodes a batch of `batch_size` sequences of up to `capacity` tokens (prompt + new) for one FusedModel."""

    def __init__(
        self,
        model: FusedModel,
        batch_size: int,
        capacity: int,
        cuda_graph: bool | None = None,
        compile: bool = False,
        max_eos: int = 8,
        compile_cache: str | Path | None = None,
        tune: bool = True,
    ):
        self.model, self.batch, self.capacity = model, batch_size, capacity
        model.fuse_kernels()
        dev = self.device = model.device
        self.cuda_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and dev.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device.")
        self.compile = compile
        self.compile_cache = compile_cache  # folder of torch.compile's caches (None: mol.compiling's default)
        # Coordinate-descent tuning of the compiled step's kernels (CUDA): about half of a first compilation; a
        # warm compile cache keeps its results (mol.compiling.keep_tuned_kernels, for the torch releases that
        # dropped them, pytorch/pytorch#172819).
        self.tune = tune
        b, n = batch_size, capacity
        lanes = model.lanes
        if model.grows_stitch_keys:
            raise ValueError(
                "the fast decoder cannot hold cross-attention stitches' growing keys; use fast=False."
            )
        if lanes is None:
            self.cache = FusedCache(kv=StaticKV(capacity))
            self.kvs = [self.cache.kv]
        else:  # each lane its own static caches; a step runs the lanes side by side on their own streams
            self.cache = FusedCache(lanes={name: FusedCache(kv=StaticKV(capacity)) for name in lanes})
            self.kvs = [c.kv for c in self.cache.lanes.values()]
        # Streams in a captured graph become its parallel branches; compiled steps keep to one stream.
        self.streams = None if compile else model.lane_streams()
        self.pooled: dict[int, dict] = {}  # each pooled router's decision, in fixed buffers
        self.valid = torch.zeros(b, n, dtype=torch.long, device=dev)  # 1 where a real token sits in the cache
        self.cols = torch.arange(n, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # the position the next step feeds
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)  # the token the next step feeds
        self.live = torch.ones(b, 1, dtype=torch.long, device=dev)  # its mask: 0 once its sequence finished
        self.finished = torch.zeros(b, dtype=torch.bool, device=dev)
        self.out = torch.zeros(b, n, dtype=torch.long, device=dev)  # tokens by position
        self.eos = torch.full((max_eos,), -1, dtype=torch.long, device=dev)
        self.pad = torch.zeros((), dtype=torch.long, device=dev)
        self.mask_zero = torch.zeros(b, 1, 1, n, dtype=model.dtype, device=dev)
        self.mask_min = torch.finfo(model.dtype).min
        # The routing trace by position: one buffer per shape (experts, top-k) of routed slot, [B, capacity,
        # slots, ...], written once a step for all its slots (two small kernels a slot added up over a step);
        # `probs[i]` / `chosen[i]` are slot i's views of them.
        self.probs: dict[int, torch.Tensor] = {}
        self.chosen: dict[int, torch.Tensor] = {}
        self._trace_groups: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        shapes: dict[tuple[int, int], list[int]] = {}
        for s in model.routed_slots:
            shapes.setdefault((len(s.experts), s.router.top_k), []).append(s.index)
        for (experts, k), indices in shapes.items():
            probs = torch.zeros(b, n, len(indices), experts, device=dev)
            chosen = torch.zeros(b, n, len(indices), k, dtype=torch.long, device=dev)
            self._trace_groups.append((indices, probs, chosen))
            for j, i in enumerate(indices):
                self.probs[i], self.chosen[i] = probs[:, :, j], chosen[:, :, j]
        if lanes is not None:  # the lanes' output mixture, traced like a routed slot
            self.mix_probs = torch.zeros(b, n, len(lanes), device=dev)
            self.mix_chosen = torch.zeros(b, n, 1, dtype=torch.long, device=dev)
        self.windows = model.windows  # sliding-window lengths, each with its own mask per step
        self.allocated = False  # the first decode step runs eagerly and allocates every cache buffer
        self._compiled: dict[bool, object] = {}
        self._warm: dict[bool, int] = {}  # greedy? -> warm-up steps run before capture
        self._graphs: dict[bool, tuple] = {}  # greedy? -> (graph, its logits output)

    # ---- one step -------------------------------------------------------------------------------------------
    def _logits(self) -> torch.Tensor:
        """Feed `ids` at position `pos`: the whole step with fixed shapes (what a graph captures)."""
        self.valid.index_copy_(1, self.pos, self.live)
        position_ids = (self.valid.cumsum(-1) - 1).clamp(min=0).index_select(1, self.pos)
        allowed = (self.cols <= self.pos) & self.valid.bool()  # [B, capacity]
        mask4d = self.mask_zero.masked_fill(~allowed[:, None, None, :], self.mask_min)
        windows = {
            w: self.mask_zero.masked_fill(
                ~(allowed & (self.cols > self.pos - w))[:, None, None, :], self.mask_min
            )
            for w in self.windows
        }
        for kv in self.kvs:
            kv.write, kv.visible = self.pos, self.capacity
        self.cache.pooled = self.pooled
        ctx = self._context(mask4d, self.live, position_ids, windows, static=True)
        logits = self.model.step_logits(self.ids, ctx)[:, -1].float()
        routings = dict(ctx.routings)
        for indices, probs, chosen in self._trace_groups:  # the routing trace, by position
            probs.index_copy_(1, self.pos, _stacked([routings[i].probs.float() for i in indices]))
            chosen.index_copy_(1, self.pos, _stacked([routings[i].chosen for i in indices]))
        if ctx.mixture is not None:
            self.mix_probs.index_copy_(1, self.pos, ctx.mixture.probs.float())
            self.mix_chosen.index_copy_(1, self.pos, ctx.mixture.chosen)
        return logits

    def _context(self, mask4d, mask2d, position_ids, windows, static: bool) -> StepContext:
        """The step's shared inputs over the decoder's caches; a lanes model gives each lane its own context (its
        static caches and rotary modules; the masks and positions are the same) and its stream."""
        m = self.model
        if m.lanes is None:
            return StepContext(
                mask4d, mask2d, position_ids, self.cache, {}, m.rotary, static=static, windows=windows
            )
        ctx = StepContext(None, mask2d, position_ids, self.cache, {}, None, static=static)
        m.add_lane_contexts(
            ctx,
            lambda name, lane: StepContext(
                mask4d,
                mask2d,
                position_ids,
                self.cache.lanes[name],
                {},
                lane.rotary,
                static=static,
                windows=windows,
            ),
        )
        ctx.lane_streams = self.streams
        return ctx

    def _advance(self, nxt: torch.Tensor) -> None:
        """Take the picked tokens as the next step's input; the plain path's bookkeeping, on fixed buffers."""
        nxt = torch.where(self.finished, self.pad, nxt)
        self.live.copy_((~self.finished).long().unsqueeze(1))
        self.finished |= (nxt.unsqueeze(-1) == self.eos).any(-1)
        self.ids.copy_(nxt.unsqueeze(1))
        self.pos += 1
        self.out.index_copy_(1, self.pos, nxt.unsqueeze(1))

    def _greedy_step(self) -> torch.Tensor:
        logits = self._logits()
        self._advance(logits.argmax(-1))
        return logits

    def _step(self, greedy: bool) -> torch.Tensor:
        """One decode step: eager for the first one (it allocates every buffer), then compiled and/or replayed."""
        fn = self._greedy_step if greedy else self._logits
        if not self.allocated or not (self.compile or self.cuda_graph):
            self.allocated = True
            return fn()
        if self.compile:
            if greedy not in self._compiled:
                from mol.compiling import use_compile_cache

                use_compile_cache(self.compile_cache)  # a later process compiles this step from the cache
                # Decode is matrix-vector work: tuning each generated kernel's launch shape pays off here.
                options = (
                    {"coordinate_descent_tuning": True} if self.device.type == "cuda" and self.tune else None
                )
                self._compiled[greedy] = torch.compile(fn, dynamic=False, options=options)
            fn = self._compiled[greedy]
        if not self.cuda_graph:
            return fn()
        if greedy not in self._graphs:
            if self._warm.get(greedy, 0) < 2:  # warm-up steps on a side stream (compilation, library handles)
                self._warm[greedy] = self._warm.get(greedy, 0) + 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = fn()
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            self._graphs[greedy] = (graph, out)
        graph, out = self._graphs[greedy]
        graph.replay()
        return out

    # ---- the prompt ---------------------------------------------------------------------------------------------
    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Run the prompt through the ordinary (eager) forward, writing positions 0..q-1 of the static cache."""
        q = input_ids.shape[1]
        self.valid.zero_()
        self.valid[:, :q] = attention_mask
        self.finished.zero_()
        write = torch.arange(q, device=self.device)
        for kv in self.kvs:
            kv.write, kv.visible = write, q
        self.cache.pooled = {}  # pooled routers decide afresh from this prompt
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        mask4d = self.model._mask4d(attention_mask, q)  # over the prompt's own keys (None: plainly causal)
        windows = self.model.window_masks(attention_mask, q)
        ctx = self._context(mask4d, attention_mask, position_ids, windows, static=False)
        logits = self.model.step_logits(input_ids, ctx, last_only=True)[:, -1].float()
        # What the routers and the gate keep between steps (a decision, evidence so far), in fixed buffers that
        # the captured steps read and write in place (mol.network.routers.keep_state).
        for i, state in self.cache.pooled.items():
            kept = self.pooled.setdefault(i, {})
            for key, value in state.items():
                keep_state(kept, key, value)
        self.pos.fill_(q - 1)
        self.live.fill_(1)
        return logits, ctx

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos: set[int] | list[int] | None = None,
        pad_token_id: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        streamer=None,
        stop=None,
        return_trace: bool = False,
    ) -> torch.Tensor | GenerateOutput:
        """Like FusedModel.generate (same tokens, and with `return_trace` the same trace); `eos` is the set of
        end-of-sequence ids."""
        input_ids = input_ids.to(self.device)
        bsz, q = input_ids.shape
        if bsz != self.batch or q + max_new_tokens > self.capacity:
            raise ValueError(
                f"this decoder holds {self.batch} sequences of {self.capacity} tokens; got {bsz} "
                f"of {q} + {max_new_tokens}."
            )
        attention_mask = (
            (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device).long()
        )
        eos = sorted(set(eos or []))
        if len(eos) > self.eos.numel():
            raise ValueError(f"at most {self.eos.numel()} end-of-sequence ids.")
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, device=self.device)
        self.pad.fill_(pad_token_id)
        greedy = not do_sample
        warpers = None if greedy else sampling_warpers(temperature, top_k, top_p)
        try:
            logits, prompt = self._prefill(input_ids, attention_mask)
            new = 0
            while new < max_new_tokens:
                if new > 0:
                    logits = self._step(greedy)
                if not greedy or new == 0:
                    self._advance(next_tokens(logits, self.ids, warpers, generator))
                new += 1
                if streamer is not None:
                    streamer(self.ids[:, 0].clone())
                if (eos and bool(self.finished.all())) or (stop is not None and stop()):
                    break
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceError(
                f"Out of memory on {self.device} while decoding {max_new_tokens} tokens for a batch "
                f"of {bsz}; use a shorter prompt, fewer new tokens or a smaller batch."
            ) from None
        tokens = torch.cat([input_ids, self.out[:, q : q + new]], 1)
        if not return_trace:
            return tokens
        return GenerateOutput(tokens, self._trace(tokens[:, : q + new - 1], prompt, q))

    def _trace(self, read_ids: torch.Tensor, prompt: StepContext, q: int) -> Trace:
        """The routing trace of every token the model read: the prompt, then each fed new token (the slots', then
        the lanes' mixture, as the plain path traces them)."""
        read = read_ids.shape[1]
        slots = []
        by_index = {s.index: s for s in self.model.all_slots}
        for i, r in prompt.routings:
            slot = by_index[i]
            probs = torch.cat([r.probs.float(), self.probs[i][:, q:read]], 1)
            chosen = torch.cat([r.chosen, self.chosen[i][:, q:read]], 1)
            slots.append(SlotTrace(i, slot.expert_names, slot.router.kind, probs.cpu(), chosen.cpu()))
        if prompt.mixture is not None:
            r = prompt.mixture
            probs = torch.cat([r.probs.float(), self.mix_probs[:, q:read]], 1)
            chosen = torch.cat([r.chosen, self.mix_chosen[:, q:read]], 1)
            kind = self.model.mixture_kind
            slots.append(SlotTrace(-1, list(self.model.lanes), kind, probs.cpu(), chosen.cpu()))
        return Trace(token_ids=read_ids.cpu(), attention_mask=self.valid[:, :read].cpu(), slots=slots)


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, 1, ...] tensors as [B, 1, len(parts), ...] (a view for one)."""
    return parts[0].unsqueeze(2) if len(parts) == 1 else torch.stack(parts, 2)


def decoder_for(model: FusedModel, batch_size: int, length: int, **options) -> FastDecoder:
    """The model's cached decoder for this batch size and a capacity of at least `length` (rounded up to 128)."""
    capacity = -(-length // 128) * 128
    cache = model.fast_decoders
    key = (batch_size, capacity, model.device, tuple(sorted(options.items())))
    if key not in cache:
        cache[key] = FastDecoder(model, batch_size, capacity, **options)
        while len(cache) > _KEEP:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def reset(model: FusedModel) -> None:
    """Forget the model's cached decoders (after replacing its weights, or to free their memory)."""
    model.fast_decoders.clear()
