"""A decode step told that every token is real (`dense`: no mask built, none read back; on an accelerator no
mask at all) gives the full forward's logits, and the plain decode, which tracks that itself through padding
and finished sequences, gives the same tokens as transformers' generate."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mol
from tests.tiny_models import identity_recipe as identity

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_dense_cached_steps_equal_the_full_forward(tiny, device):
    model = mol.build(identity(tiny("llama")), device=device, dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache, dense=True).logits]
        steps += [model(ids[:, t : t + 1], cache=cache, dense=True).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad", [0, 3])
def test_plain_decode_equals_transformers_with_padding_and_eos(tiny, device, pad):
    folder = tiny("llama")
    model = mol.build(identity(folder), device=device, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").to(device).eval()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], fast=False)
    theirs = hf.generate(
        ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert torch.equal(ours, theirs)
    eos = int(ours[0, 14])  # sequence 0 ends there: the later steps carry padding for it
    ended = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, fast=False
    )
    expected = hf.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(ended, expected)
