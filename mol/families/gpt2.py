"""GPT-2 (DialoGPT, distilgpt2): learned absolute positions, LayerNorm, Conv1D projections."""

from mol.families import Family

FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    head="lm_head",
    positions="transformer.wpe",
    layer_takes=(),
    mlp="mlp",
    examples=("openai-community/gpt2", "microsoft/DialoGPT-small"),
)
