"""MoL: fuse transformer blocks from different language models into one working model.

    import mol
    recipe = mol.Recipe.from_yaml("assets/recipes/prose-code-token.yaml")
    model = mol.build(recipe)
    out = model.generate(ids, max_new_tokens=32)
    model.last_trace
"""

from mol.adapters import BottleneckAdapter, LinearAdapter
from mol.calibrate import calibrate
from mol.errors import MolError
from mol.fused import FusedModel, MoLOutput
from mol.loading import build
from mol.plan import Plan, plan
from mol.recipe import AdapterSpec, ExpertRef, Recipe, RouterSpec, Slot
from mol.routers import PooledRouter, SimpleRouter, TokenRouter, load_balancing_loss, z_loss
from mol.runtime import MoLRuntime, default_recipe
from mol.trace import SlotTrace, Trace
from mol.weights import load_trainable, save_trainable

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec", "BottleneckAdapter", "ExpertRef", "FusedModel", "LinearAdapter", "MoLOutput", "MolError",
    "Plan", "PooledRouter", "Recipe", "RouterSpec", "SimpleRouter", "Slot", "SlotTrace", "TokenRouter", "Trace",
    "MoLRuntime", "build", "calibrate", "default_recipe", "load_balancing_loss", "load_trainable", "plan", "save_trainable", "z_loss",
]
