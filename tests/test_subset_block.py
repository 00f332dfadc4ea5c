"""A routed expert run for its own tokens (mol.network.subset_block) gives what its layer's own forward gives there:
slot outputs, logits with padding and sliding windows, generated tokens through a KV cache, adapters across
widths, and the gradients that training reads; layers of other shapes keep their own forward."""

import pytest
import torch

import mol
from mol.network.modeling_mol import StepContext
from mol.network.subset_block import runs_on_subsets

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _routed(tiny, family, top_k=1, experts=2, **overrides):
    a = tiny(family, width=64, **overrides)
    b = tiny(family, width=64, seed=1, **overrides)
    names = ["a:1", "b:1", "b:2"][:experts]
    recipe = mol.Recipe.from_dict(
        {
            "name": "routed",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": [
                "a:0",
                {"experts": names, "router": {"type": "token", "top_k": top_k}},
                {"experts": ["a:2", "b:3"], "router": {"type": "token"}},
                "a:3",
            ],
        }
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32, load_tokenizer=False)
    torch.manual_seed(0)
    for slot in model.routed_slots:
        torch.nn.init.normal_(slot.router.proj.weight, std=2.0)
    return model


def _set_subsets(model, on: bool) -> None:
    for slot in model.routed_slots:
        for e in slot.experts:
            e.subsets = on and runs_on_subsets(e.layer)


def _ids(bsz=3, length=11, seed=0):
    return torch.randint(1, 380, (bsz, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_slot_on_own_tokens_equals_every_expert_on_every_token(tiny, family):
    model = _routed(tiny, family, top_k=2, experts=3)
    slot = model.slots[1]
    assert all(e.subsets for e in slot.experts)
    bsz, length = 3, 13
    h = torch.randn(bsz, length, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(bsz, length, dtype=torch.long)
    pos = torch.arange(length).expand(bsz, length)
    windows = model.window_masks(mask, length)
    with torch.no_grad():
        ctx = StepContext(None, mask, pos, None, {}, model.rotary, windows=windows)
        got = slot(h, ctx)
        dense = slot(h, StepContext(None, mask, pos, None, {}, model.rotary, static=True, windows=windows))
    chosen = ctx.routings[0][1].chosen
    assert len({int(c) for c in chosen.reshape(-1)}) == 3  # every expert got tokens, none got them all
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_with_left_padding_match_the_layers_own_forward(tiny, family):
    model = _routed(tiny, family)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask, trace=False).logits
        _set_subsets(model, False)
        want = model(ids, attention_mask=mask, trace=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_keep_their_window(tiny):
    model = _routed(tiny, "mistral", sliding_window=4)
    assert any(e.window == 4 for s in model.routed_slots for e in s.experts)
    ids = _ids(length=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask, trace=False).logits
        _set_subsets(model, False)
        want = model(ids, attention_mask=mask, trace=False).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_generation_through_the_cache_gives_the_same_tokens(tiny, family):
    model = _routed(tiny, family, top_k=2, experts=3)
    ids = _ids(length=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    gen = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[], fast=False)
    with torch.no_grad():
        got = model.generate(ids, return_trace=True, **gen)
        _set_subsets(model, False)
        want = model.generate(ids, return_trace=True, **gen)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.trace.slots, want.trace.slots, strict=True):
        assert torch.equal(a.chosen, b.chosen)


def test_adapters_across_widths_and_training_gradients_match(tiny):
    base = tiny("llama", width=64)
    wide = tiny("qwen2", width=96)
    recipe = mol.Recipe.from_dict(
        {
            "name": "cross",
            "base": "a",
            "models": {"a": str(base), "w": str(wide)},
            "slots": ["a:0", {"experts": ["a:1", "w:1"], "router": {"type": "token"}}, "a:2"],
        }
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32, load_tokenizer=False)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.routed_slots[0].router.proj.weight, std=2.0)
    for adapter in model.adapters().values():
        for p in adapter.parameters():
            torch.nn.init.normal_(p, std=0.05)
    assert model.adapters() and all(e.subsets for e in model.routed_slots[0].experts)
    ids = _ids(length=10)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, trace=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.trainable_parameters().items() if p.grad is not None}
        return out.loss.detach(), grads

    loss, grads = loss_and_grads()
    _set_subsets(model, False)
    want_loss, want_grads = loss_and_grads()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and any("router" in n for n in grads)
    assert any("adapter" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_other_layer_shapes_keep_their_own_forward(tiny):
    recipe = mol.Recipe.from_dict(
        {
            "name": "mixed",
            "base": "l",
            "models": {"l": str(tiny("llama", width=64)), "g": str(tiny("gpt2", width=64))},
            "slots": ["l:0", {"experts": ["l:1", "g:1"], "router": {"type": "token"}}],
        }
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32, load_tokenizer=False)
    llama, gpt2 = model.routed_slots[0].experts
    assert llama.subsets and not gpt2.subsets
    torch.nn.init.normal_(model.routed_slots[0].router.proj.weight, std=2.0)
    ids = _ids()
    with torch.no_grad():
        got = model(ids, trace=False).logits
        _set_subsets(model, False)
        want = model(ids, trace=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
