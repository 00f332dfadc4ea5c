"""Llama-like decoders: pre-norm RMSNorm, RoPE, gated MLP (Llama, Mistral, Qwen2/3, SmolLM3, OLMo 2).

Gemma and Granite have their own family files (their models scale embeddings or logits around the layers).
Gemma 2 and 3 (soft-capped attention and logits) and OLMo (norms without weights) are refused with the list of
what is supported rather than fused wrongly."""

from mol.families import Family

FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    rotary="model.rotary_emb",
    layer_takes=("position_ids", "position_embeddings"),
    mlp="mlp",
    fused_projections=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ),
    examples=("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M"),
)
