"""The benchmark's models (random weights at realistic shapes, configs only, nothing downloaded) and recipes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import mol

# A ~1.1B Llama (TinyLlama's shape) and a ~0.5B second source of another width (a Qwen2-style block with
# biases on q/k/v). Both use one 32000-id vocabulary so that they can be fused.
SHAPES = {
    "full": {
        "base": dict(
            model_type="llama",
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        "other": dict(
            model_type="qwen2",
            hidden_size=1280,
            intermediate_size=3456,
            num_hidden_layers=24,
            num_attention_heads=20,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
    },
    "smoke": {
        "base": dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=384,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        "other": dict(
            model_type="qwen2",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=384,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
    },
}


def config(shape: dict):
    from transformers import AutoConfig

    kw = dict(shape)
    return AutoConfig.for_model(kw.pop("model_type"), bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def make_source(
    folder: Path, shape: dict, device: str, seed: int, keep: bool = False, dtype: torch.dtype | None = None
):
    """Random-initialise a source at `shape` on `device` (`dtype`, default bf16 on GPU, float32 on the CPU) and
    save it as a Hugging Face folder. Returns the in-memory model when `keep` (the transformers baseline), else
    None."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config(shape), dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    os.sync()  # written pages reach the disk, so that a later cold read really reads them
    if keep:
        return model
    del model
    return None


def parameter_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def identity_recipe(base: Path, layers: int) -> mol.Recipe:
    return mol.Recipe.from_dict(
        {"name": "identity", "models": {"base": str(base)}, "slots": [f"base:0-{layers - 1}"]}
    )


def routed_layers(layers: int) -> list[int]:
    """Base layers whose slot becomes token-routed with a foreign expert: every third one, from the third."""
    return list(range(2, layers, 3))


def two_source_recipe(base: Path, other: Path, base_layers: int, other_layers: int) -> mol.Recipe:
    """Every base layer in order; every third slot token-routes (top-1) between the base layer and the
    depth-aligned layer of the other source (of another width, through linear adapters)."""
    slots = []
    for i in range(base_layers):
        if i in routed_layers(base_layers):
            j = min(other_layers - 1, round(i * other_layers / base_layers))
            slots.append({"experts": [f"base:{i}", f"other:{j}"], "router": {"type": "token", "top_k": 1}})
        else:
            slots.append(f"base:{i}")
    return mol.Recipe.from_dict(
        {
            "name": "two-source",
            "base": "base",
            "models": {"base": str(base), "other": str(other)},
            "adapter": "linear",
            "slots": slots,
        }
    )


def quarter_recipe(base: Path, other: Path, base_layers: int, other_layers: int) -> mol.Recipe:
    """A quarter of the layers of each source (every fourth), interleaved; the other's through adapters."""
    b = list(range(0, base_layers, 4))
    o = list(range(0, other_layers, 4))
    slots = []
    for k in range(max(len(b), len(o))):
        if k < len(b):
            slots.append(f"base:{b[k]}")
        if k < len(o):
            slots.append(f"other:{o[k]}")
    return mol.Recipe.from_dict(
        {
            "name": "quarter",
            "base": "base",
            "models": {"base": str(base), "other": str(other)},
            "adapter": "linear",
            "slots": slots,
        }
    )


def routed_slot_recipe(base: Path) -> tuple[mol.Recipe, mol.Recipe]:
    """One plain slot of one block, and one slot of two equal-size experts with top-1 token routing."""
    one = mol.Recipe.from_dict({"name": "one-block", "models": {"base": str(base)}, "slots": ["base:0"]})
    two = mol.Recipe.from_dict(
        {
            "name": "routed-slot",
            "models": {"base": str(base)},
            "slots": [{"experts": ["base:0", "base:1"], "router": {"type": "token", "top_k": 1}}],
        }
    )
    return one, two


def top2_of_4_recipe(base: Path) -> mol.Recipe:
    """One slot of four equal-size experts (base layers 0-3) with top-2 token routing."""
    return mol.Recipe.from_dict(
        {
            "name": "routed-slot-top2-of-4",
            "models": {"base": str(base)},
            "slots": [{"experts": [f"base:{i}" for i in range(4)], "router": {"type": "token", "top_k": 2}}],
        }
    )


def other_recipe(other: Path, layers: int) -> mol.Recipe:
    """The second source alone (every layer, one per slot): a lane's own model."""
    return mol.Recipe.from_dict(
        {"name": "other", "models": {"other": str(other)}, "slots": [f"other:0-{layers - 1}"]}
    )


def lanes_recipe(base: Path, other: Path) -> mol.Recipe:
    """Two lanes, each a whole source on its own stream with its own head, and a per-token output mixture."""
    return mol.Recipe.from_dict(
        {
            "name": "two-lanes",
            "models": {"base": str(base), "other": str(other)},
            "lanes": {"base": {"base": "base"}, "other": {"base": "other"}},
            "mixture": "token",
        }
    )


def randomise_routers(model, seed: int = 0, std: float = 1.0) -> None:
    """Routers start uniform (every token picks expert 0 on ties); random ones split tokens as trained ones do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in model.routed_slots:
            w = slot.router.proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
