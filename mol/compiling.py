"""Compiling a fused model for training and full-sequence forwards: the whole step, or block by block.

An eager transformer block spends much of its time outside its matrix products: RMS norms computed in float32,
rotary embeddings, activations and residual adds, each a separate pass over the activations. Compiling fuses them.
`compile_network` compiles one step's whole network; it breaks only where a routed slot asks the host how many
tokens each expert got, and runs fastest (bench/README.md: 45.7% MFU in training against 39.0% block by block
and 25.5% eager). `compile_blocks` compiles each block on its own: blocks of one family and shape share one
compiled graph, and the routing stays in Python.

    model = mol.build(recipe, device="cuda", dtype=torch.bfloat16)
    compile_network(model)         # the whole step (mol.train: TrainConfig(compile=True)); or block by block:
    compile_blocks(model)          # then train or run forwards as usual

A routed expert's MLP sees a varying number of tokens; those sizes are compiled as dynamic after the first
change. The fast decoder (mol.fast) compiles its whole step itself and needs none of this.

Compilation costs tens of seconds a process; `use_compile_cache` keeps its results (inductor's FX graph, AOT
autograd and autotuning caches, and Triton's kernels, all under TORCHINDUCTOR_CACHE_DIR) in a folder that
outlives the process, so that a new process compiles the same step from that cache. The fast decoder uses it
whenever it compiles."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mol.fused import FusedModel

# Every routed MLP size, padding change and block shape is a guard set on one code object; the default limit (8)
# would silently fall back to eager on recipes with several families.
_RECOMPILE_LIMIT = 64


def default_compile_cache() -> Path:
    """MOL_COMPILE_CACHE if set, else `mol/torch-compile` under the user's cache folder (XDG_CACHE_HOME)."""
    if os.environ.get("MOL_COMPILE_CACHE"):
        return Path(os.environ["MOL_COMPILE_CACHE"]).expanduser()
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
        / "mol"
        / "torch-compile"
    )


def use_compile_cache(folder: str | Path | None = None) -> Path:
    """Point torch.compile's on-disk caches at `folder` (created if missing) and return it. With no folder, a
    TORCHINDUCTOR_CACHE_DIR already set (by the user, or by an earlier compilation of this process) is kept,
    and otherwise `default_compile_cache()` is used; torch's own default lives in the temporary folder, which
    a restarted machine or container loses. torch reads the variable at each cache access, so this holds for
    compilations that follow; the caches themselves are on by default (inductor's `fx_graph_cache`,
    `autotune_local_cache`, functorch's `enable_autograd_cache`)."""
    if folder is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path = Path(folder).expanduser() if folder is not None else default_compile_cache()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    return path


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))


def compile_network(
    model: FusedModel, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None
) -> FusedModel:
    """Compile one step's whole network (embeddings, every slot with its adapters and router, final norm and
    head) in place. The graph breaks only where a routed slot asks the host how many tokens each expert got,
    so a step is a handful of graphs rather than one per block: far less host work per step than
    `compile_blocks`, for training and full-sequence forwards (the fast decoder compiles its own step)."""
    _raise_recompile_limit()
    if model.compiled_step_logits is None:
        model.compiled_step_logits = torch.compile(
            model.step_logits, backend=backend, mode=mode, dynamic=dynamic
        )
    return model


def uncompile_network(model: FusedModel) -> FusedModel:
    """Undo `compile_network`: the model runs its plain Python step again."""
    model.compiled_step_logits = None
    return model


def compile_blocks(
    model: FusedModel,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    routers: bool = False,
) -> FusedModel:
    """Compile every expert block's source layer (and, with `routers`, every router) in place (torch.compile).
    Returns the model. Idempotent."""
    _raise_recompile_limit()
    for slot in model.slots:
        parts = [block.layer for block in slot.experts]
        # A compiled router fuses its float32 normalisation, projection, softmax and top-k: faster for a forward
        # alone, but in training steps (bench/README.md) its extra compiled call cost more than it saved.
        if routers and slot.router is not None:
            parts.append(slot.router)
        for part in parts:
            if part._compiled_call_impl is None:  # nn.Module.compile's own record
                part.compile(backend=backend, mode=mode, dynamic=dynamic)
    return model
