"""Granite: Llama-like layers (their residual and attention multipliers live inside the layer), with embeddings
multiplied and logits divided by config scalars around them."""

from dataclasses import replace

from mol.families.llama import FAMILY as LLAMA

FAMILY = replace(
    LLAMA,
    name="granite",
    model_types=("granite",),
    embedding_multiplier="embedding_multiplier",
    logits_divisor="logits_scaling",
    examples=("ibm-granite/granite-3.3-2b-instruct",),
)
