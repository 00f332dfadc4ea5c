"""Closed-form adapter initialisation: least squares on paired activations from a few hundred tokens.

For every foreign expert (layer j of model M inside the base stream), pair the fused stream entering its slot
with M's own residual stream entering layer j, on the same tokens, and solve for the maps in and out. Slots are
calibrated in order within one forward pass, so each slot sees the stream its calibrated predecessors make."""

from __future__ import annotations

import logging

import torch

from mol.errors import DataError
from mol.fused import FusedModel

log = logging.getLogger(__name__)


def _encode(model: FusedModel, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = model.tokenizer
    if tok is None:
        raise DataError("Calibration needs the base model's tokenizer; its folder has no tokenizer files.")
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, verbose=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    if len(ids) < 16:
        raise DataError(
            f"Calibration text gives {len(ids)} tokens; give at least a few hundred tokens of text."
        )
    ids = ids[:max_tokens]
    seq = min(256, len(ids))
    rows = [ids[i : i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    x = torch.tensor(rows)
    return x, torch.ones_like(x)


@torch.no_grad()
def _source_hidden_states(model: FusedModel, alias: str, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The source model's own residual stream entering each layer (positions removed for absolute families)."""
    from transformers import AutoModelForCausalLM

    src = model.plan.sources[alias]
    ref = AutoModelForCausalLM.from_pretrained(
        str(src.folder), dtype=torch.float32, attn_implementation="sdpa"
    )
    ref.eval()
    out = ref(input_ids, output_hidden_states=True)
    hidden = [h.float() for h in out.hidden_states[:-1]]  # [i] enters layer i
    if src.family.positions is not None:
        pos_module = ref.get_submodule(src.family.positions)
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0) + src.family.position_offset
        p = torch.nn.functional.embedding(pos, pos_module.weight).float()
        hidden = [h - p for h in hidden]
    del ref
    return hidden


@torch.no_grad()
def calibrate(model: FusedModel, texts: list[str] | str, max_tokens: int = 512) -> dict[str, float]:
    """Fit every adapter of `model` in closed form; returns the relative residual of each fit (0 = exact)."""
    if isinstance(texts, str):
        texts = [texts]
    input_ids, mask = _encode(model, texts, max_tokens)
    targets: dict[str, list[torch.Tensor]] = {}
    for slot in model.slots:
        for e in slot.experts:
            if e.adapter is not None and e.alias not in targets:
                targets[e.alias] = _source_hidden_states(model, e.alias, input_ids)
    if not targets:
        return {}
    report: dict[str, float] = {}

    def fit_slot(slot, args):  # a forward pre-hook on each slot: fitted before its experts run
        h = args[0]
        h_base = h.reshape(-1, h.shape[-1]).float().cpu()
        for e in slot.experts:
            if e.adapter is None:
                continue
            layer_index = int(e.name.rsplit(":", 1)[1])
            h_block = targets[e.alias][layer_index].reshape(-1, targets[e.alias][layer_index].shape[-1])
            e.adapter.float().fit(h_base, h_block)
            e.adapter.to(model.dtype)
            # the fit runs on the host; the adapter lives with its block
            on = next(e.adapter.parameters()).device
            pred = e.adapter.into(h_base.to(on, model.dtype)).float().cpu()
            report[f"slot {slot.index} {e.name}"] = float(
                (pred - h_block).norm() / h_block.norm().clamp(min=1e-9)
            )

    was_training = model.training
    model.eval()
    hooks = [slot.register_forward_pre_hook(fit_slot) for slot in model.slots]
    try:
        model(input_ids.to(model.device), attention_mask=mask.to(model.device), trace=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    log.info("calibrated %d adapters", len(report))
    return report
