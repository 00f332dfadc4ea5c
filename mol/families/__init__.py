"""Architecture families. Each family file declares, as data, where a model keeps its layers, embeddings,
final norm, head and position modules, and which keywords its decoder layer takes. Nothing outside this
package knows an architecture's tensor names."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from mol.errors import UnsupportedArchitectureError

# Transformers renames the cache keyword between releases (past_key_value -> past_key_values -> cache;
# GPT-NeoX uses layer_past). Unknown keywords are silently swallowed by **kwargs, which would lose the KV
# cache with no error, so the name is read from the layer's own signature, newest name first.
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past", "past_key_value")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # module path of the layer list, e.g. "model.layers"
    embed: str  # token embedding module
    head: str  # output projection module
    final_norm: str | None  # final norm module (None: the family has none)
    rotary: str | None = None  # rotary embedding module (RoPE families)
    positions: str | None = None  # learned absolute position embedding (GPT-2, OPT)
    position_offset: int = 0  # OPT stores positions shifted by 2
    project_in: str | None = None  # OPT-350m style projections around the stack
    project_out: str | None = None
    # Other names the head has had, in files or in modules of other transformers releases (GPT-NeoX saves
    # `embed_out` while transformers 5 calls the module `lm_head`).
    head_aliases: tuple[str, ...] = ()
    # Keywords the layer's forward takes besides hidden states, mask and cache.
    layer_takes: tuple[str, ...] = ("position_ids", "position_embeddings")
    # The layer's MLP submodule, called on the normed stream alone (mlp(x) -> update). A token-routed slot runs it
    # only for the tokens that chose the expert; None where the MLP is not one module (OPT's fc1/fc2).
    mlp: str | None = None
    # Config fields of scalars the model applies around its layers: embeddings multiplied by one, logits divided
    # by the other (Granite's `embedding_multiplier` and `logits_scaling`).
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None
    # The embedding module's non-persistent buffer holding sqrt(hidden size), which scales its output (Gemma). It
    # is in no checkpoint, so the loader sets it.
    embedding_scale_buffer: str | None = None
    notes: str = ""
    examples: tuple[str, ...] = field(default_factory=tuple)

    def scalars(self, config) -> tuple[float, float]:
        """(embedding multiplier, logits divisor) of a model of this family, 1.0 where it has none."""

        def value(name):
            return float(getattr(config, name, None) or 1.0) if name else 1.0

        return value(self.embedding_multiplier), value(self.logits_divisor)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def head_names(self) -> tuple[str, ...]:
        return (self.head, *self.head_aliases)

    def head_in_files(self, tensor_names) -> str | None:
        """The head's prefix in the checkpoint, or None when the head is tied to the embedding."""
        return next((h for h in self.head_names() if f"{h}.weight" in tensor_names), None)

    def module_prefixes(self) -> dict[str, str]:
        """The non-layer modules a fused model borrows from its base, by role."""
        out = {"embed": self.embed}
        for role in ("final_norm", "positions", "project_in", "project_out"):
            path = getattr(self, role)
            if path:
                out[role] = path
        return out


def cache_keyword(layer) -> str:
    params = inspect.signature(layer.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise UnsupportedArchitectureError(
        f"{type(layer).__name__}.forward takes none of {CACHE_KEYWORDS}; this transformers release is not "
        "supported. Install a transformers version in the range pinned by mol-studio."
    )


def _registry() -> dict[str, Family]:
    from mol.families import gemma, gpt2, gpt_neox, granite, llama, opt, phi

    reg: dict[str, Family] = {}
    for fam in (
        llama.FAMILY,
        gemma.FAMILY,
        granite.FAMILY,
        gpt2.FAMILY,
        gpt_neox.FAMILY,
        opt.FAMILY,
        phi.FAMILY,
    ):
        for mt in fam.model_types:
            reg[mt] = fam
    return reg


FAMILIES: dict[str, Family] = {}


def supported_model_types() -> list[str]:
    if not FAMILIES:
        FAMILIES.update(_registry())
    return sorted(FAMILIES)


def family_for(model_type: str, where: str = "") -> Family:
    if not FAMILIES:
        FAMILIES.update(_registry())
    fam = FAMILIES.get(model_type)
    if fam is None:
        names = ", ".join(sorted({f.name for f in FAMILIES.values()}))
        raise UnsupportedArchitectureError(
            f"{where or 'model'}: architecture '{model_type}' is not supported. Supported families: {names} "
            f"(model_type one of: {', '.join(supported_model_types())})."
        )
    return fam
