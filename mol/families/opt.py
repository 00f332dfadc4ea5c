"""OPT: learned absolute positions stored with an offset of 2; optional project_in/out (OPT-350m)."""

from mol.families import Family

FAMILY = Family(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    positions="model.decoder.embed_positions",
    position_offset=2,
    project_in="model.decoder.project_in",
    project_out="model.decoder.project_out",
    layer_takes=("position_ids",),
    fused_projections=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    examples=("facebook/opt-125m",),
)
