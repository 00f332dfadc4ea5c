"""Llama-family architectures beyond the tiny fixtures' (SmolLM3, OLMo 2) match transformers; those whose model
wraps its layers in more than embeddings, norm and head (Gemma, Granite, OLMo) are refused with a clear error
instead of being fused wrongly."""

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mol
from mol.errors import UnsupportedArchitectureError


def _source(folder, tokenizer_dir, model_type: str, **extra):
    cfg = AutoConfig.for_model(model_type, vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _identity(folder):
    return mol.Recipe.from_dict({"name": "identity", "models": {"m": str(folder)}, "slots": ["m:0-2"]})


@pytest.mark.parametrize("model_type", ["smollm3", "olmo2"])
def test_identity_recipe_matches_transformers(tmp_path, tokenizer_dir, model_type):
    folder = _source(tmp_path / model_type, tokenizer_dir, model_type)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    model = mol.build(_identity(folder), device="cpu")
    ids = torch.randint(1, 380, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gemma", "granite", "olmo"])
def test_architectures_with_more_around_their_layers_are_refused(tmp_path, tokenizer_dir, model_type):
    folder = _source(tmp_path / model_type, tokenizer_dir, model_type)
    with pytest.raises(UnsupportedArchitectureError, match=f"architecture '{model_type}' is not supported.*llama"):
        mol.plan(_identity(folder))
