"""MoL: fuse transformer blocks from different language models into one working model.

    import mol
    recipe = mol.Recipe.from_file("assets/recipes/prose-code-token.yaml")
    model = mol.build(recipe)
    out = model.generate(ids, max_new_tokens=32, return_trace=True)
    out.sequences, out.trace    # the tokens, and the routing trace of the call that made them

Names are imported on first use, so `import mol.errors` or `mol.Recipe` stays cheap (no torch import)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "mol.access": ["AccessPolicy"],
    "mol.network.adapters": ["BottleneckAdapter", "LinearAdapter"],
    "mol.calibration": ["calibrate"],
    "mol.errors": ["MolError"],
    "mol.evaluation": ["evaluate"],
    "mol.export.auto": ["register_auto_classes"],
    "mol.fused": ["FusedModel", "MoLOutput"],
    "mol.loading": ["build"],
    "mol.planning": ["Plan", "plan"],
    "mol.recipe": ["AdapterSpec", "ExpertRef", "Recipe", "RouterSpec", "Slot"],
    "mol.network.routers": ["PooledRouter", "SimpleRouter", "TokenRouter", "load_balancing_loss", "z_loss"],
    "mol.runtime": ["MoLRuntime", "default_recipe"],
    "mol.trace": ["SlotTrace", "Trace"],
    "mol.training": ["TrainConfig", "train"],
    "mol.weights": ["load_trainable", "save_trainable"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mol' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
