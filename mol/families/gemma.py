"""Gemma (the first generation): Llama-like layers (its RMSNorm adds one to its weight and its MLP is GeGLU, both
inside the modules), with embeddings scaled by sqrt(hidden size) in the embedding module itself. Gemma 2 and 3
soft-cap attention and logits and are not supported yet."""

from dataclasses import replace

from mol.families.llama import FAMILY as LLAMA

FAMILY = replace(
    LLAMA,
    name="gemma",
    model_types=("gemma",),
    examples=("google/gemma-2b",),
)
