"""GPT-NeoX (Pythia): partial rotary, parallel residual, untied `embed_out` head."""

from mol.families import Family

FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    head="lm_head",
    head_aliases=("embed_out",),
    rotary="gpt_neox.rotary_emb",
    layer_takes=("position_ids", "position_embeddings"),
    mlp="mlp",
    examples=("EleutherAI/pythia-160m",),
)
