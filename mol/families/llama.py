"""Llama-like decoders: pre-norm RMSNorm, RoPE, gated MLP (Llama, Mistral, Qwen2/3, SmolLM3, OLMo 2).

Not here, because the model around the layers does more than embed, norm and project: Gemma scales its
embeddings (and Gemma 2 soft-caps its logits), OLMo's norms have no weights. Those are refused with the list
of what is supported rather than fused wrongly. Granite has its own family file (granite.py)."""

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
    examples=("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M"),
)
