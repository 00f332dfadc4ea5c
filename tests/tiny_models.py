"""Tiny random checkpoints of every supported family, saved as real Hugging Face folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 384
CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune. def main(argv):\n    return sorted(argv, key=len)\n"
    "import os\nfor line in open(path):\n    print(line.strip())\n"
) * 20


def make_tokenizer(folder: Path, vocab_size: int = VOCAB) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(str(folder))
    return folder


def config_for(family: str, width: int, layers: int, **overrides):
    from transformers import (
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        PhiConfig,
        Qwen2Config,
        Qwen3Config,
    )

    heads = max(2, width // 16)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[
            family
        ]
        cfg = cls(
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=256, **common)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            rotary_pct=0.5,
            tie_word_embeddings=False,
            **common,
        )
    elif family == "opt":
        cfg = OPTConfig(
            hidden_size=width,
            ffn_dim=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            word_embed_proj_dim=width,
            **common,
        )
    elif family == "phi":
        cfg = PhiConfig(
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            partial_rotary_factor=0.5,
            **common,
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, list(v) if isinstance(v, tuple) else v)  # tuples: hashable for the fixture's cache
    return cfg


def make_model(
    folder: Path, family: str, width: int, layers: int, tokenizer_dir: Path, seed: int = 0, **overrides
) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    cfg = config_for(family, width, layers, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger-than-default weights so layers visibly matter in comparisons
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(str(folder), safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def identity_recipe(folder, layers: int = 4):
    """Every layer of one model, in order, one per slot: the fused model must be that model."""
    import mol

    return mol.Recipe(
        name="identity",
        base="m",
        models={"m": str(folder)},
        slots=[mol.Slot((mol.ExpertRef("m", i),)) for i in range(layers)],
    )


def assert_round_trips(model, recipe, tmp_path: Path, ids: torch.Tensor, want: torch.Tensor) -> None:
    """Its trained parts saved and built again give the logits `want` exactly; exported and loaded by
    transformers, the same logits (to 1e-5) and the same greedy continuation of `ids[:, :6]`."""
    from transformers import AutoModelForCausalLM

    import mol
    from mol.export import export

    again = mol.build(
        recipe,
        device="cpu",
        dtype=torch.float32,
        weights=mol.save_trainable(model, tmp_path / "w.safetensors"),
    )
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
    loaded = AutoModelForCausalLM.from_pretrained(str(export(model, tmp_path / "out").path)).eval()
    with torch.no_grad():
        assert (loaded(ids).logits - want).abs().max().item() <= 1e-5
        theirs = loaded.generate(ids[:, :6], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert theirs.tolist() == model.generate(ids[:, :6], max_new_tokens=5, eos_token_id=[]).tolist()


def greedy_by_full_forward(
    model, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`ids` and `steps` greedy tokens, each from a full-sequence forward with no cache (the reference a cached
    decode must equal); `mask` covers `ids`, and every new token is real."""
    seq, m = ids, torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq, m).logits[:, -1].argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], 1)
    return seq
