"""Phi-1/1.5/2: partial rotary, parallel attention+MLP, LayerNorm, head with bias."""

from mol.families import Family

FAMILY = Family(
    name="phi",
    model_types=("phi",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.final_layernorm",
    head="lm_head",
    rotary="model.rotary_emb",
    layer_takes=("position_ids", "position_embeddings"),
    mlp="mlp",
    fused_projections=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    examples=("microsoft/phi-1_5",),
)
