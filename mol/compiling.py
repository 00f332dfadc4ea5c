"""Compiling a fused model for training and full-sequence forwards: the whole step, or block by block.

An eager transformer block spends much of its time outside its matrix products: RMS norms computed in float32,
rotary embeddings, activations and residual adds, each a separate pass over the activations. Compiling fuses them.
`compile_network` compiles one step's whole network; it breaks only where a routed slot asks the host how many
tokens each expert got, and runs fastest (bench/README.md: 43.3% MFU in training against 38.5% block by block
and 29.3% eager). `compile_blocks` compiles each block on its own: blocks of one family and shape share one
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
    keep_tuned_kernels()
    if folder is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path = Path(folder).expanduser() if folder is not None else default_compile_cache()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    return path


def keep_tuned_kernels() -> bool:
    """Make a warm compile cache keep the kernel launch shapes that coordinate-descent tuning found. Some torch
    releases (2.11 among them; pytorch/pytorch#172819) drop the cached result's "tuned" mark when a kernel has a
    single configuration, so every new process tunes every kernel again: about 20 s of a warm first call of the
    fast decoder. Where the installed inductor has that defect, its cache recheck is replaced by one that keeps
    the mark; elsewhere nothing changes. Returns whether the fix is in place. Idempotent."""
    try:
        import inspect

        from torch._inductor.runtime import triton_heuristics as th
    except Exception:  # no inductor runtime (a minimal torch build): nothing to fix
        return False
    autotuner = th.CachingAutotuner
    recheck = getattr(autotuner, "recheck_autotune_cache", None)
    if recheck is None:
        return False
    if getattr(recheck, "_mol_keeps_tuned", False):
        return True
    try:
        source = inspect.getsource(recheck)
    except (OSError, TypeError):
        return False
    if "len(configs) > 1" not in source:  # a release with the fix, or a different recheck: leave it be
        return False
    required = ("check_autotune_cache", "triton_config_to_hashable", "dynamo_timed")
    if not all(hasattr(th, name) for name in required) or not hasattr(autotuner, "_precompile_config"):
        return False

    def recheck_keeping_tuned(self, reload_kernel_from_src):
        configs = [result.config for result in self.compile_results]
        cached, _, self.autotune_cache_info = th.check_autotune_cache(
            configs, self.filename, self.inductor_meta
        )
        if len(cached) != 1:  # no cached choice: inductor autotunes (and tunes) as it would anyway
            return
        best = cached[0]
        tuned = getattr(best, "found_by_coordesc", False)
        key = th.triton_config_to_hashable(best)
        match = next((r for r in self.compile_results if th.triton_config_to_hashable(r.config) == key), None)
        if match is None:  # tuning found a shape outside the precompiled ones: build that one
            with th.dynamo_timed("CachingAutotuner.slow_precompile_config"):
                if self.fn.fn is None:
                    self.fn = reload_kernel_from_src().fn
                match = self._precompile_config(best)
        match.config.found_by_coordesc = tuned  # what run() reads to skip tuning
        self.compile_results = [match]

    recheck_keeping_tuned._mol_keeps_tuned = True
    recheck_keeping_tuned.__doc__ = recheck.__doc__
    autotuner.recheck_autotune_cache = recheck_keeping_tuned
    return True


def _configure_dynamo() -> None:
    keep_tuned_kernels()
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    # A routed expert's MLP runs its chosen tokens alone through hooks (TokenSubset) that a plain slot's layer
    # of the same class does not have. By default dynamo does not guard on hooks, so every layer reused the graph
    # of whichever compiled first: a plain one's left every routed MLP running on every token (right values,
    # twice the MLP work). With the guard, layers with and without the hooks each get their own graph.
    if hasattr(config, "skip_nnmodule_hook_guards"):
        config.skip_nnmodule_hook_guards = False


def compile_network(
    model: FusedModel, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None
) -> FusedModel:
    """Compile one step's whole network (embeddings, every slot with its adapters and router, final norm and
    head) in place. The graph breaks only where a routed slot asks the host how many tokens each expert got,
    so a step is a handful of graphs rather than one per block: far less host work per step than
    `compile_blocks`, for training and full-sequence forwards (the fast decoder compiles its own step)."""
    _configure_dynamo()
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
    _configure_dynamo()
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
