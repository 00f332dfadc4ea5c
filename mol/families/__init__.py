"""Architecture families. Each family file declares, as data, where a model keeps its layers, embeddings,
final norm, head and position modules, and which keywords its decoder layer takes. Nothing outside this
package knows an architecture's tensor names.

Families are looked up by the config's `model_type` in one registry: the built-in ones are registered at the
end of this module, and `register_family(Family(...))` adds another without touching mol (`unregister_family`
takes it out again)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mol.errors import UnsupportedArchitectureError


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
    # Linear projections of the layer that read one input (paths relative to the layer, each group in output
    # order), run as one matrix product on a GPU (mol.network.fusing): Llama's q/k/v and gate/up.
    fused_projections: tuple[tuple[str, ...], ...] = ()
    # Config fields of scalars the model applies around its layers: embeddings multiplied by one, logits divided
    # by the other (Granite's `embedding_multiplier` and `logits_scaling`).
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None
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


# model_type -> Family: the one registry `family_for` and `supported_model_types` read. The built-in families are
# registered at the end of this module; others (a family file of one's own, a test's) through `register_family`.
FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Make `family` the family of each of its model types. A model type that already has a family is refused
    (ValueError) unless `replace`, which takes it over. Returns the family."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family, not {type(family).__name__}.")
    types = family.model_types
    if (
        not isinstance(types, tuple)
        or not types
        or not all(isinstance(t, str) and t.strip() for t in types)
        or len(set(types)) != len(types)
    ):
        raise ValueError(
            f"family '{family.name}': model_types must be a tuple of distinct names, got {types!r}."
        )
    taken = {t: FAMILIES[t].name for t in types if t in FAMILIES}
    if taken and not replace:
        listed = ", ".join(f"'{t}' (family '{name}')" for t, name in taken.items())
        raise ValueError(
            f"family '{family.name}': model_type {listed} is already registered; pass replace=True to take "
            "it over, or unregister_family the other first."
        )
    for t in types:
        FAMILIES[t] = family
    return family


def unregister_family(family: Family) -> None:
    """Remove the model types registered to `family` (those another family has taken over stay as they are)."""
    for t in family.model_types:
        if FAMILIES.get(t) is family:
            del FAMILIES[t]


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str, where: str = "") -> Family:
    fam = FAMILIES.get(model_type)
    if fam is None:
        names = ", ".join(sorted({f.name for f in FAMILIES.values()}))
        raise UnsupportedArchitectureError(
            f"{where or 'model'}: architecture '{model_type}' is not supported. Supported families: {names} "
            f"(model_type one of: {', '.join(supported_model_types())})."
        )
    return fam


def _register_builtins() -> None:
    """The families that ship with mol, each in its own file; the one place they are registered."""
    from mol.families import gemma, gpt2, gpt_neox, granite, llama, opt, phi

    for module in (llama, gemma, granite, gpt2, gpt_neox, opt, phi):
        register_family(module.FAMILY)


_register_builtins()
