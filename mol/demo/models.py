"""The three architectures of the demo family, as plain transformers configs (no option outside each family's
usual ones), and the data each model is trained on. A branch has no architecture of its own: it is its base's,
at the same width."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig

MAX_POSITIONS = 1024


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    domains: tuple[str, ...]  # training data; validation is on the same domains, equally weighted
    summary: str
    base: str | None = None  # a branch: continued training of this model's shipped weights


SPECS = {
    "mango-bard": ModelSpec(
        "mango-bard", "llama", ("prose",), "Llama-family prose specialist (Shakespeare only)"
    ),
    "mango-coder": ModelSpec(
        "mango-coder", "gpt_neox", ("code",), "GPT-NeoX code specialist (CPython standard library only)"
    ),
    "mango-base": ModelSpec("mango-base", "gpt2", ("prose", "code"), "GPT-2 generalist (prose and code)"),
    "mango-base-prose": ModelSpec(
        "mango-base-prose",
        "gpt2",
        ("prose",),
        "GPT-2 prose branch of mango-base (its weights trained on further on Shakespeare only)",
        base="mango-base",
    ),
    "mango-base-code": ModelSpec(
        "mango-base-code",
        "gpt2",
        ("code",),
        "GPT-2 code branch of mango-base (its weights trained on further on the standard library only)",
        base="mango-base",
    ),
}


def make_config(name: str, vocab_size: int, smoke: bool = False) -> PretrainedConfig:
    """The config of one family member. `smoke` shrinks every width and depth for a seconds-long CPU run while
    keeping the same families and options."""
    if SPECS[name].base is not None:  # a branch keeps its base's architecture and width
        return make_config(SPECS[name].base, vocab_size, smoke=smoke)
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if name == "mango-bard":
        d, layers, heads, kv, inter = (48, 2, 2, 1, 96) if smoke else (256, 6, 8, 2, 640)
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=d // heads,
            hidden_act="silu",
            max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            tie_word_embeddings=True,
            **special,
        )
    if name == "mango-coder":
        d, layers, heads, inter = (40, 2, 2, 80) if smoke else (192, 6, 6, 512)
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            hidden_act="gelu",
            max_position_embeddings=MAX_POSITIONS,
            # Partial rotary (half of each 32-wide head), as in Pythia-style models: fusion must keep it.
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            layer_norm_eps=1e-5,
            use_parallel_residual=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            tie_word_embeddings=False,
            **special,
        )
    if name == "mango-base":
        d, layers, heads = (32, 2, 2) if smoke else (160, 8, 5)
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
            **special,
        )
    raise KeyError(name)


def describe(config: PretrainedConfig) -> str:
    """One line: family, width, depth, heads."""
    c = config
    if c.model_type == "llama":
        return (
            f"Llama, d_model {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads "
            f"({c.num_key_value_heads} KV heads, head dim {c.head_dim}), SwiGLU {c.intermediate_size}, "
            "RoPE, RMSNorm, tied embeddings"
        )
    if c.model_type == "gpt_neox":
        rot = c.rope_parameters.get("partial_rotary_factor", 0.25)
        return (
            f"GPT-NeoX, d_model {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
            f"MLP {c.intermediate_size}, partial rotary {rot}, parallel residual, untied embeddings"
        )
    if c.model_type == "gpt2":
        return (
            f"GPT-2, d_model {c.n_embd}, {c.n_layer} layers, {c.n_head} heads, MLP {4 * c.n_embd}, "
            f"learned absolute positions ({c.n_positions}), tied embeddings"
        )
    return c.model_type
