"""The fused model as `mol.build` returns it: the network (mol.network: embeddings of the base, a stack of
slots, the base's final norm and head) with its plan and tokenizer, the routing trace of each call, losses for
training, and generation (plain here, fast in mol.fast)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mol.errors import ResourceError
from mol.export.auto import register_auto_classes
from mol.layout import network_config
from mol.network.modeling_mol import CrossAttentionStitch, FusedCache, MoLNetwork, StepContext, lm_loss
from mol.network.routers import Routing, load_balancing_loss, z_loss
from mol.trace import SlotTrace, Trace

__all__ = [
    "FusedCache",
    "FusedModel",
    "GenerateOutput",
    "MoLOutput",
    "StepContext",
    "next_tokens",
    "sampling_warpers",
]


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


class FusedModel(MoLNetwork):
    """A language model assembled from blocks of several source models: the network of its plan, with the
    plan, the base's tokenizer, routing traces and generation. Build it with `mol.build(recipe)`."""

    def __init__(self, plan, init_device: torch.device | str | None = None, tokenizer=None):
        super().__init__(network_config(plan), init_device=init_device)
        self.plan = plan
        self.recipe = plan.recipe
        self.tokenizer = tokenizer
        self.bytes_read = 0  # what building it read from the sources' files (mol.build)
        self.placement = None  # slots spread over devices or offloaded (mol.placement); None: one device
        # mol.fast's decoders (static caches, captured graphs), most recently used last: see mol.fast.decoder_for
        self.fast_decoders: OrderedDict = OrderedDict()

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: FusedCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        trace: bool = True,
        dense: bool | None = None,
        losses: bool = True,
        last_only: bool = False,
    ) -> MoLOutput:
        """One step over `input_ids` (after `cache`, if given). With `trace`, the output's `trace` holds the step's
        routing copied to the host (a synchronisation per routed slot, which training has no use for: it passes
        `trace=False` and reads `routings`, gradients attached). `dense`: the caller knows whether every token,
        cached and new, is real (MoLNetwork.step); `losses=False` leaves the routers' auxiliary losses out
        (generation has no use for them); `last_only`: the logits of the last position only, [B, 1, vocab]."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).long()
        if cache is None and use_cache:
            cache = self.new_cache()
        logits, ctx = self.step(input_ids, attention_mask, cache, dense, last_only)

        by_index = {s.index: s for s in self.all_slots} if trace else {}
        step_trace = (
            None
            if not trace
            else Trace(
                token_ids=input_ids.detach().cpu(),
                attention_mask=attention_mask.detach().cpu(),
                slots=[
                    SlotTrace(
                        i,
                        by_index[i].expert_names,
                        by_index[i].router.kind,
                        r.probs.detach().float().cpu(),
                        r.chosen.detach().cpu(),
                    )
                    for i, r in ctx.routings
                ]
                + self._mixture_trace(ctx),
            )
        )
        out = MoLOutput(logits=logits, cache=cache, trace=step_trace, routings=ctx.routings)
        if ctx.routings and losses:
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
            out.loss = lm_loss(logits, labels)
        return out

    def _mixture_trace(self, ctx) -> list[SlotTrace]:
        """The lanes' output mixture as one more row of the trace: slot -1, the lanes as its experts."""
        if ctx.mixture is None:
            return []
        r = ctx.mixture
        return [
            SlotTrace(
                -1,
                list(self.lanes),
                self.mixture_kind,
                r.probs.detach().float().cpu(),
                r.chosen.detach().cpu(),
            )
        ]

    @property
    def mixture_kind(self) -> str:
        """How the lanes' output mixture shows in a trace: "sequence" (one lane per sequence) or "mixture"."""
        return "sequence" if self.gate.per_sequence else "mixture"

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
        streams = list(self.lanes.values()) if self.lanes is not None else [self]
        tables = [(n.positions, n.position_offset) for n in streams] + [
            (e.positions, e.position_offset) for s in self.all_slots for e in s.experts
        ]
        sizes = [t.weight.shape[0] - offset for t, offset in tables if t is not None]
        read = prompt_tokens + max(max_new_tokens - 1, 0)  # the last new token is never fed back
        if sizes and read > min(sizes):
            raise ResourceError(
                f"The prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens runs past the "
                f"{min(sizes)} positions of the recipe's learned position table; shorten the prompt or ask "
                "for fewer new tokens."
            )

    def decodes_fast(self, eos_ids: int = 1) -> bool:
        """Whether `generate(fast=None)` takes the fast decoder (mol.fast): on one CUDA device, in eval mode, with
        at most 8 end-of-sequence ids and no cross-attention stitch (whose keys grow with the text). Its steps
        replay captured graphs, which run no forward hooks."""
        return (
            self.device.type == "cuda"
            and not self.training
            and self.placement is None
            and eos_ids <= 8
            and not self.grows_stitch_keys
        )

    @property
    def grows_stitch_keys(self) -> bool:
        """Whether a cross-attention stitch keeps keys that grow with the text (the fast decoder's buffers are
        fixed)."""
        return any(isinstance(st, CrossAttentionStitch) for st in getattr(self, "stitches", ()))

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
            fast = self.decodes_fast(len(eos))
        if fast and max_new_tokens > 0:  # (the fast decoder fuses the model's kernels itself)
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
        self.fuse_kernels()  # a model moved to a GPU after building
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
        """The plain decoding loop; `traces` (None: not kept) receives each step's routing trace. Its host reads:
        one of the prompt's mask, then, where some token ends a sequence (`eos`), one count per step (which says
        both whether all have finished and whether the next step is still free of padding); with no `eos`
        nothing finishes, every new token is real and no step waits for the device."""
        step_ids, step_mask = tokens[0], masks[0]
        bsz = step_ids.shape[0]
        # no padding so far: a step needs no attention mask (MoLNetwork._mask4d)
        dense = bool(step_mask.all())
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        eos_ids = torch.tensor(sorted(eos), device=self.device, dtype=torch.long)
        real = torch.ones(bsz, 1, dtype=torch.long, device=self.device)
        done = 0  # sequences finished, as last read
        for _ in range(max_new_tokens):
            out = self.forward(
                step_ids,
                step_mask,
                cache=cache,
                trace=traces is not None,
                dense=dense,
                losses=False,
                last_only=True,
            )
            if traces is not None:
                traces.append(out.trace)
            nxt = next_tokens(out.logits[:, -1].float(), step_ids, warpers, generator)
            if eos:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
                step_mask = (~finished).long().unsqueeze(1)
                dense = dense and done == 0
                finished = finished | torch.isin(nxt, eos_ids)
            else:
                step_mask = real
            step_ids = nxt.unsqueeze(1)
            tokens.append(step_ids)
            masks.append(step_mask)
            if streamer is not None:
                streamer(nxt)
            if eos:
                done = int(finished.sum())
            if done == bsz or (stop is not None and stop()):
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


register_auto_classes()  # a built model's exports load back through the auto classes, with this very network
