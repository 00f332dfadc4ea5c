"""`MoLRuntime`: the first quick start's interface, kept working. With only models given it makes the default
recipe: the first model is the base, and each slot token-routes between depth-aligned layers of all models
(layer i of the base with layer round(i * L_m / L_base) of model m)."""

from __future__ import annotations

from pathlib import Path

import torch

from mol.fused import FusedModel, GenerateOutput, MoLOutput
from mol.recipe import AdapterSpec, ExpertRef, Recipe, RouterSpec, Slot
from mol.sources import load_source

_ROUTERS = {"simple": "token", "token": "token", "pooled": "pooled"}


def default_recipe(
    models: list[str],
    adapter_type: str = "linear",
    router_type: str = "simple",
    top_k: int = 1,
    name: str = "default",
) -> Recipe:
    if not models:
        from mol.errors import RecipeError

        raise RecipeError("Give at least one model (a local folder or a Hub id).")
    aliases = [f"m{i}" for i in range(len(models))]
    layers = [load_source(a, m).num_layers for a, m in zip(aliases, models, strict=True)]
    base_layers = layers[0]
    slots = []
    for i in range(base_layers):
        experts = [ExpertRef(aliases[0], i)]
        for a, n in zip(aliases[1:], layers[1:], strict=True):
            experts.append(ExpertRef(a, min(n - 1, round(i * n / base_layers))))
        router = RouterSpec(_ROUTERS.get(router_type, router_type), top_k) if len(experts) > 1 else None
        slots.append(Slot(tuple(experts), router))
    return Recipe(
        name=name,
        base=aliases[0],
        models=dict(zip(aliases, models, strict=True)),
        slots=slots,
        adapter=AdapterSpec(adapter_type),
    )


class MoLRuntime:
    """Build and run a fused model from a list of models (or an explicit recipe)."""

    def __init__(
        self,
        models: list[str | Path] | None = None,
        adapter_type: str = "linear",
        router_type: str = "simple",
        recipe: Recipe | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        top_k: int = 1,
    ):
        if recipe is None:
            recipe = default_recipe([str(m) for m in models or []], adapter_type, router_type, top_k)
        self.recipe = recipe
        self.device, self.dtype = device, dtype
        self.model: FusedModel | None = None

    def load_models(self) -> FusedModel:
        from mol.loading import build

        self.model = build(self.recipe, device=self.device, dtype=self.dtype)
        return self.model

    def _ready(self) -> FusedModel:
        return self.model if self.model is not None else self.load_models()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> MoLOutput:
        return self._ready()(input_ids, attention_mask=attention_mask, **kwargs)

    __call__ = forward

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor | GenerateOutput:
        """FusedModel.generate; `return_trace=True` gives the tokens and their routing trace."""
        return self._ready().generate(input_ids, **kwargs)

    @property
    def tokenizer(self):
        return self._ready().tokenizer
