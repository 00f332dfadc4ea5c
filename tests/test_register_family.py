"""A family registered from outside mol (`register_family`) works end to end: StarCoder2, which no built-in
family covers, declared here as data, fuses as a one-expert-per-slot recipe that reproduces transformers' own
logits and greedy generation. The registry refuses a model type twice unless told to replace it."""

import shutil
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Starcoder2Config

import mol
from mol.errors import UnsupportedArchitectureError
from mol.families import (
    Family,
    family_for,
    register_family,
    supported_model_types,
    unregister_family,
)

# Llama-like layers (pre-norm, RoPE from the model's rotary module, self_attn + mlp), with LayerNorms and biases.
STARCODER2 = Family(
    name="starcoder2",
    model_types=("starcoder2",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    rotary="model.rotary_emb",
    layer_takes=("position_ids", "position_embeddings"),
    mlp="mlp",
    examples=("bigcode/starcoder2-3b",),
)


@pytest.fixture
def starcoder2_family():
    assert "starcoder2" not in supported_model_types()  # else this test would not be testing a new family
    family = register_family(STARCODER2)
    yield family
    unregister_family(family)
    assert "starcoder2" not in supported_model_types()


# A sliding window shorter than prompt + generation (the block keeps its source's window), and a tied head.
VARIANTS = {
    "plain": dict(sliding_window=None, tie_word_embeddings=False),
    "window-tied": dict(sliding_window=6, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def starcoder2_folder(request, tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("starcoder2") / f"tiny-starcoder2-{request.param}"
    cfg = Starcoder2Config(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **VARIANTS[request.param],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger-than-default weights so the layers visibly matter
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(str(folder), safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    assert (folder / "model.safetensors").is_file()
    return folder


def reference(folder):
    return AutoModelForCausalLM.from_pretrained(
        str(folder), attn_implementation="sdpa", dtype=torch.float32
    ).eval()


def one_expert_recipe(folder) -> mol.Recipe:
    return mol.Recipe.from_dict({"name": "starcoder2", "models": {"m": str(folder)}, "slots": ["m:0-2"]})


def test_unregistered_starcoder2_is_refused(starcoder2_folder):
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'starcoder2' is not supported"):
        mol.plan(one_expert_recipe(starcoder2_folder))


def test_a_registered_family_matches_transformers(starcoder2_family, starcoder2_folder):
    assert family_for("starcoder2") is starcoder2_family
    model = mol.build(one_expert_recipe(starcoder2_folder), device="cpu", dtype=torch.float32)
    hf = reference(starcoder2_folder)
    ids = torch.randint(1, 380, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    prompt = ids[:1, :8]
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[])
    expected = hf.generate(
        prompt,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        attention_mask=torch.ones_like(prompt),
    )
    assert generated.tolist() == expected.tolist()


def test_a_model_type_is_registered_once_unless_replaced(starcoder2_family):
    with pytest.raises(ValueError, match="'starcoder2' \\(family 'starcoder2'\\) is already registered"):
        register_family(STARCODER2)
    with pytest.raises(ValueError, match="'llama' \\(family 'llama'\\) is already registered"):
        register_family(replace(STARCODER2, name="other", model_types=("llama",)))
    assert family_for("llama").name == "llama"

    newer = replace(STARCODER2, notes="a newer declaration")
    assert register_family(newer, replace=True) is newer
    assert family_for("starcoder2") is newer
    unregister_family(starcoder2_family)  # no longer registered to it: changes nothing
    assert family_for("starcoder2") is newer
    unregister_family(newer)
    assert "starcoder2" not in supported_model_types()
    with pytest.raises(ValueError, match="model_types"):
        register_family(replace(STARCODER2, model_types=()))
