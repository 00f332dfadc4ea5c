"""Trainable weights (adapters and routers; the final norm and head where a run trained them) saved apart from the
source models, in one small safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mol.errors import CheckpointError


def save_trainable(model, path: str | Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {"recipe": model.recipe.to_yaml(), "format": "mol-trainable/1"}
    if metadata:
        meta["extra"] = json.dumps(metadata)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # never leave a half-written weights file behind
    return path


def load_trainable(model, path: str | Path, strict: bool = True) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file '{path}' does not exist.")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a valid weights file: {exc}.") from None
    expected = model.trainable_state_dict()
    head = getattr(model, "head_names", None)
    if head is not None and any(k in head() and k not in expected for k in state):
        model.train_head(
            requires_grad=False
        )  # a run that trained the head (`train_head`): its weights are these
        expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"'{path}' was trained for another recipe: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}. Load it with the recipe it was saved with."
        )
    for k, v in state.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"'{path}': '{k}' has shape {list(v.shape)}, the recipe needs {list(expected[k].shape)}."
            )
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for k, v in state.items():
            target = params.get(k, buffers.get(k))
            if target is not None:
                target.copy_(v.to(target.dtype))
