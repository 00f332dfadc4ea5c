"""Sampling in `FusedModel.generate` is transformers' own temperature / top-k / top-p warpers on the fused
model's logits (plain and fast paths); a prompt past the sources' positions is a ResourceError."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import mol
from mol.errors import ResourceError
from mol.fused import GenerateOutput, sampling_warpers
from tests.tiny_models import identity_recipe as identity


@pytest.fixture(scope="module")
def model(tiny):
    return mol.build(identity(tiny("llama")), device="cpu")


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warpers, applied one by one in generate's order, then softmax."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(ids, logits)
    if top_k:
        logits = TopKLogitsWarper(top_k)(ids, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(ids, logits)
    return logits.softmax(-1)


def test_sampling_warpers_filter_like_transformers():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for temperature, top_k, top_p in [(0.7, 0, 0.8), (1.0, 10, 1.0), (1.3, 20, 0.5), (1.0, 0, 0.3)]:
        got = sampling_warpers(temperature, top_k, top_p)(ids, logits.clone()).softmax(-1)
        torch.testing.assert_close(got, _reference_probs(logits, temperature, top_k, top_p), rtol=0, atol=0)
    kept = (sampling_warpers(1.0, 0, 0.5)(ids, logits.clone()) > float("-inf")).sum(-1)
    assert (kept < 50).all() and (kept >= 1).all()  # top-p really drops tokens


@pytest.mark.parametrize("fast", [False, True])
def test_generate_samples_from_the_warped_distribution(model, fast):
    """The first sampled token of each of 64 copies of a prompt is the draw torch.multinomial makes, with the same
    generator, from transformers' warped distribution of the model's own logits; every draw lies in the top-p
    nucleus, which holds well under half the vocabulary (without top-p, some draw would fall outside)."""
    temperature, top_k, top_p = 0.7, 0, 0.3
    prompt = torch.randint(1, 380, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(prompt).logits[:, -1].float()
    probs = _reference_probs(logits, temperature, top_k, top_p)
    nucleus = probs[0] > 0
    assert 1 < int(nucleus.sum()) < logits.shape[-1] // 2
    ids = prompt.expand(64, -1)
    out = model.generate(
        ids,
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=[],
        generator=torch.Generator().manual_seed(11),
        fast=fast,
    )
    drawn = out[:, -1]
    assert nucleus[drawn].all()
    expected = torch.multinomial(probs.expand(64, -1), 1, generator=torch.Generator().manual_seed(11))[:, 0]
    assert drawn.tolist() == expected.tolist()


def test_generate_returns_the_trace_only_when_asked(model):
    ids = torch.randint(1, 380, (2, 5), generator=torch.Generator().manual_seed(4))
    plain = model.generate(ids, max_new_tokens=3, eos_token_id=[], fast=False)
    out = model.generate(ids, max_new_tokens=3, eos_token_id=[], fast=False, return_trace=True)
    assert isinstance(plain, torch.Tensor) and isinstance(out, GenerateOutput)
    assert torch.equal(out.sequences, plain)
    assert out.trace.token_ids.shape == (2, 7)  # the prompt and every new token fed back
    assert not hasattr(model, "last_trace") and not hasattr(model, "keep_trace")


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_past_the_position_limit_is_a_resource_error(tiny, family, fast):
    model = mol.build(identity(tiny(family)), device="cpu")
    assert model.position_limit == 256
    long = torch.randint(1, 380, (1, 257), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ResourceError, match="257 tokens, more than the 256 positions"):
        model.generate(long, max_new_tokens=2, fast=fast)
    ok = model.generate(long[:, :250], max_new_tokens=2, eos_token_id=[], fast=fast)
    assert ok.shape == (1, 252)


def test_decoding_past_a_learned_position_table_is_a_resource_error(tiny):
    """GPT-2's learned positions end at 256: decoding beyond is refused before it starts (an IndexError inside
    the step otherwise); a rotary model has no table and decodes on."""
    gpt2 = mol.build(identity(tiny("gpt2")), device="cpu")
    ids = torch.randint(1, 380, (1, 250), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ResourceError, match="learned position table"):
        gpt2.generate(ids, max_new_tokens=10, eos_token_id=[], fast=False)
    assert gpt2.generate(ids, max_new_tokens=7, eos_token_id=[], fast=False).shape == (1, 257)
