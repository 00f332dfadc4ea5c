"""Architectures beyond the tiny fixtures' match transformers: SmolLM3 and OLMo 2 (Llama family), Granite
(embeddings multiplied, logits divided) and Gemma (embeddings scaled), also as the base of a routed cross-family
recipe and its export. Those whose model wraps its layers in more than the families describe (Gemma 2, OLMo)
are refused with a clear error instead of being fused wrongly."""

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mol
from mol.errors import UnsupportedArchitectureError
from mol.export import export

GRANITE = dict(
    embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.3
)


def _source(folder, tokenizer_dir, model_type: str, **extra):
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _identity(folder):
    return mol.Recipe.from_dict({"name": "identity", "models": {"m": str(folder)}, "slots": ["m:0-2"]})


@pytest.mark.parametrize("model_type", ["smollm3", "olmo2", "granite", "gemma"])
def test_identity_recipe_matches_transformers(tmp_path, tokenizer_dir, model_type):
    folder = _source(
        tmp_path / model_type, tokenizer_dir, model_type, **(GRANITE if model_type == "granite" else {})
    )
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    model = mol.build(_identity(folder), device="cpu")
    ids = torch.randint(1, 380, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gemma2", "olmo"])
def test_architectures_with_more_around_their_layers_are_refused(tmp_path, tokenizer_dir, model_type):
    folder = _source(tmp_path / model_type, tokenizer_dir, model_type)
    with pytest.raises(
        UnsupportedArchitectureError, match=f"architecture '{model_type}' is not supported.*llama"
    ):
        mol.plan(_identity(folder))


@pytest.mark.parametrize("model_type", ["granite", "gemma"])
def test_as_the_base_of_a_routed_cross_family_recipe_and_its_export(
    tmp_path, tokenizer_dir, tiny, model_type
):
    granite = _source(
        tmp_path / model_type, tokenizer_dir, model_type, **(GRANITE if model_type == "granite" else {})
    )
    recipe = mol.Recipe.from_dict(
        {
            "name": "fused",
            "base": "g",
            "models": {"g": str(granite), "l": str(tiny("llama", width=48))},
            "slots": ["g:0", {"experts": ["g:1", "l:1"]}, "g:2"],
        }
    )
    model = mol.build(recipe, device="cpu")
    if model_type == "granite":
        assert (model.embedding_multiplier, model.logits_divisor) == (3.0, 4.0)
    torch.nn.init.normal_(model.routed_slots[0].router.proj.weight, std=2.0)
    loaded = AutoModelForCausalLM.from_pretrained(str(export(model, tmp_path / "out").path)).eval()
    ids = torch.randint(1, 380, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_granite_stack_exports_as_granite(tmp_path, tokenizer_dir):
    granite = _source(tmp_path / "granite", tokenizer_dir, "granite", **GRANITE)
    recipe = mol.Recipe.from_dict({"name": "g-stack", "models": {"g": str(granite)}, "slots": ["g:2", "g:0"]})
    model = mol.build(recipe, device="cpu")
    out = export(model, tmp_path / "out").path
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.config.model_type == "granite"
    ids = torch.randint(1, 380, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
