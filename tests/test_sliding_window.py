"""Sources with sliding-window attention (Mistral; Qwen2 with some layers windowed) keep their windows inside a
fused model: the identity recipe matches transformers beyond the window, with left padding, through the cache,
on the fast path and in an exported MoLForCausalLM."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mol
from mol.export import export

WINDOW = 4
QWEN_TYPES = ("full_attention", "sliding_attention", "sliding_attention", "full_attention")


@pytest.fixture(scope="module")
def sources(tiny):
    return {
        "mistral": tiny("mistral", sliding_window=WINDOW),
        "qwen2": tiny("qwen2", sliding_window=WINDOW, use_sliding_window=True, layer_types=QWEN_TYPES),
    }


def identity(folder, layers=4):
    return mol.Recipe.from_dict(
        {"name": "identity", "models": {"m": str(folder)}, "slots": [f"m:0-{layers - 1}"]}
    )


def batch():
    ids = torch.randint(1, 380, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_identity_recipe_matches_transformers_beyond_the_window(sources, family):
    hf = AutoModelForCausalLM.from_pretrained(str(sources[family]), attn_implementation="sdpa").eval()
    model = mol.build(identity(sources[family]), device="cpu")
    windows = [e.window for s in model.slots for e in s.experts]
    assert windows == ([WINDOW] * 4 if family == "mistral" else [None, WINDOW, WINDOW, None])
    ids, mask = batch()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
        unwindowed = mol.build(identity(sources[family]), device="cpu")
        for s in unwindowed.slots:
            s.experts[0].window = None
        full = unwindowed(ids[:1]).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    assert (full - ours[:1]).abs().max() > 1e-2  # the window matters at this length: the check has teeth
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], fast=False)
    reference = hf.generate(
        ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert plain.tolist() == reference.tolist()  # through the KV cache, past the window
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], fast=True)
    assert fast.tolist() == plain.tolist()


def test_routed_recipe_with_a_windowed_source_exports_the_same_model(sources, tiny, tmp_path):
    recipe = mol.Recipe.from_dict(
        {
            "name": "windowed",
            "base": "q",
            "models": {"q": str(sources["qwen2"]), "m": str(sources["mistral"])},
            "slots": ["q:0", {"experts": ["q:1", "m:1"]}, "q:2-3"],
        }
    )
    model = mol.build(recipe, device="cpu")
    torch.nn.init.normal_(model.routed_slots[0].router.proj.weight, std=2.0)
    loaded = AutoModelForCausalLM.from_pretrained(str(export(model, tmp_path / "out").path)).eval()
    ids, mask = batch()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-4)
