"""Regional compilation: each source block compiled on its own with torch.compile.

An eager transformer block spends much of its time outside its matrix products: RMS norms computed in float32,
rotary embeddings, activations and residual adds, each a separate pass over the activations. Compiling fuses them.
Compiling block by block rather than the whole model keeps the routing (which tokens go to which expert: a
data-dependent choice) in Python, and blocks of one family and shape share one compiled graph, so compiling
costs about one block per distinct block shape, not one per layer.

    model = mol.build(recipe, device="cuda", dtype=torch.bfloat16)
    compile_blocks(model)          # then train or run forwards as usual (mol.train: TrainConfig(compile=True))

A routed expert's MLP sees a varying number of tokens; those sizes are compiled as dynamic after the first
change. The fast decoder (mol.fast) compiles its whole step itself and needs none of this."""

from __future__ import annotations

import torch

from mol.fused import FusedModel

# Every routed MLP size, padding change and block shape is a guard set on one code object; the default limit (8)
# would silently fall back to eager on recipes with several families.
_RECOMPILE_LIMIT = 64


def compile_blocks(model: FusedModel, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None, routers: bool = False) -> FusedModel:
    """Compile every expert block's source layer (and, with `routers`, every router) in place (torch.compile).
    Returns the model. Idempotent."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    for slot in model.slots:
        parts = [block.layer for block in slot.experts]
        # A compiled router fuses its float32 normalisation, projection, softmax and top-k: faster for a forward
        # alone, but in training steps (bench/README.md) its extra compiled call cost more than it saved.
        if routers and slot.router is not None:
            parts.append(slot.router)
        for part in parts:
            if not getattr(part, "_mol_compiled", False):
                part.compile(backend=backend, mode=mode, dynamic=dynamic)
                part._mol_compiled = True
    return model
