"""Llama-like decoders: pre-norm RMSNorm, RoPE, gated MLP (Llama, Mistral, Qwen2/3, SmolLM, Gemma)."""

from mol.families import Family

FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3", "olmo", "olmo2", "granite"),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    rotary="model.rotary_emb",
    layer_takes=("position_ids", "position_embeddings"),
    mlp="mlp",
    examples=("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M"),
)
