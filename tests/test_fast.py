"""The fast decode path (static cache, fixed step buffers, CUDA graph on GPU) gives the plain path's tokens and
trace; a token-routed slot runs an expert's MLP only for the tokens that chose it, with the same output."""

import pytest
import torch

import mol
from mol import fast as mol_fast
from mol.fast import FastDecoder, StaticKV, decoder_for
from tests.tiny_models import identity_recipe as identity

FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox", "opt", "phi"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def routed(tiny):
    """Cross-family, cross-width: token routers (top-1 and top-2), a pooled router, foreign absolute positions."""
    recipe = mol.Recipe.from_dict(
        {
            "name": "cross",
            "base": "l",
            "models": {
                "l": str(tiny("llama", width=64)),
                "g": str(tiny("gpt2", width=96)),
                "n": str(tiny("gpt_neox", width=48, layers=2)),
                "o": str(tiny("opt", width=32, layers=2)),
            },
            "slots": [
                "l:0",
                {"experts": ["l:1", "g:1"]},
                "g:2",
                {"experts": ["l:2", "n:0", "o:0"], "router": {"type": "token", "top_k": 2}},
                {"experts": ["l:3", "n:1"], "router": {"type": "pooled"}},
            ],
        }
    )
    model = mol.build(recipe, device="cpu")
    torch.manual_seed(0)
    for slot in model.routed_slots:  # routing that really varies by token
        torch.nn.init.normal_(slot.router.proj.weight, std=2.0)
    return model


def _prompt(bsz, q, seed, pad=0):
    ids = torch.randint(1, 380, (bsz, q), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, :pad] = 0  # left padding in the last sequence
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_greedy_tokens_equal_plain(tiny, family):
    model = mol.build(identity(tiny(family)), device="cpu")
    ids, mask = _prompt(2, 7, 1, pad=3)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], fast=False)
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], fast=True)
    assert fast.tolist() == plain.tolist()


def test_fast_routed_recipe_tokens_and_trace_equal_plain(routed):
    ids, mask = _prompt(3, 6, 2, pad=2)
    plain = routed.generate(
        ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[], fast=False, return_trace=True
    )
    plain_trace = plain.trace
    fast = routed.generate(
        ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[], fast=True, return_trace=True
    )
    trace = fast.trace
    assert fast.sequences.tolist() == plain.sequences.tolist()
    assert torch.equal(trace.token_ids, plain_trace.token_ids)
    assert torch.equal(trace.attention_mask, plain_trace.attention_mask)
    assert [s.slot for s in trace.slots] == [s.slot for s in plain_trace.slots]
    for a, b in zip(trace.slots, plain_trace.slots, strict=True):
        assert torch.equal(a.chosen, b.chosen)
        assert (a.probs - b.probs).abs().max() <= 1e-5
    # The decoder is cached and reused: a second prompt of the same shape gives the plain tokens too.
    ids2, mask2 = _prompt(3, 6, 3)
    assert (
        routed.generate(ids2, attention_mask=mask2, max_new_tokens=9, eos_token_id=[], fast=True).tolist()
        == routed.generate(ids2, attention_mask=mask2, max_new_tokens=9, eos_token_id=[], fast=False).tolist()
    )


def test_fast_stops_at_end_of_sequence_like_plain(routed):
    ids, mask = _prompt(2, 5, 4)
    free = routed.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    eos = [int(free[0, 7]), int(free[1, 9])]  # tokens that will come up: one sequence finishes early
    plain = routed.generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, fast=False
    )
    fast = routed.generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, fast=True
    )
    assert fast.tolist() == plain.tolist()


def test_fast_sampling_matches_plain_with_the_same_generator(routed):
    ids, mask = _prompt(2, 5, 5)
    kw = dict(
        attention_mask=mask, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=20, temperature=0.8
    )
    plain = routed.generate(ids, generator=torch.Generator().manual_seed(9), fast=False, **kw)
    fast = routed.generate(ids, generator=torch.Generator().manual_seed(9), fast=True, **kw)
    assert fast.tolist() == plain.tolist()


def test_streamer_and_stop(tiny):
    model = mol.build(identity(tiny("llama")), device="cpu")
    ids, _ = _prompt(1, 4, 6)
    seen = []
    out = model.generate(
        ids,
        max_new_tokens=10,
        eos_token_id=[],
        fast=True,
        streamer=lambda t: seen.append(int(t[0])),
        stop=lambda: len(seen) >= 5,
    )
    assert out.shape == (1, 9)
    assert out[0, 4:].tolist() == seen


def test_static_cache_writes_in_place():
    kv = StaticKV(capacity=8)
    kv.write, kv.visible = torch.arange(3), 3
    k, v = kv.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), layer_idx=5)
    assert k.shape == (1, 2, 3, 4) and kv.keys[5].shape == (1, 2, 8, 4)
    kv.write, kv.visible = torch.tensor([3]), 8
    k, _ = kv.update(2 * torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), layer_idx=5)
    assert k.shape == (1, 2, 8, 4) and k[0, 0, :, 0].tolist() == [1, 1, 1, 2, 0, 0, 0, 0]
    assert k.data_ptr() == kv.keys[5].data_ptr()


def test_fast_is_the_default_on_one_cuda_device_only(tiny, monkeypatch):
    model = mol.build(identity(tiny("llama")), device="cpu")
    used = []
    original = mol_fast.decoder_for
    monkeypatch.setattr(mol_fast, "decoder_for", lambda *a, **k: used.append(1) or original(*a, **k))
    ids, _ = _prompt(1, 4, 7)
    model.generate(ids, max_new_tokens=3, eos_token_id=[])  # on the CPU: the plain path
    assert not used
    model.generate(ids, max_new_tokens=3, eos_token_id=[], fast=True)
    assert used


def test_decoders_are_cached_per_shape(tiny):
    model = mol.build(identity(tiny("llama")), device="cpu")
    a = decoder_for(model, 2, 40)
    assert decoder_for(model, 2, 100) is a  # both fit a capacity of 128
    assert decoder_for(model, 3, 40) is not a
    with pytest.raises(ValueError):
        a.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)


def test_routed_slot_runs_the_mlp_only_for_chosen_tokens(tiny):
    """Same output as running every expert's MLP on every token, and the MLP really sees fewer rows."""
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    recipe = mol.Recipe.from_dict(
        {
            "name": "r",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": ["a:0", {"experts": ["a:1", "b:1"]}, "a:2"],
        }
    )
    model = mol.build(recipe, device="cpu")
    torch.nn.init.normal_(model.slots[1].router.proj.weight, std=2.0)
    rows_seen = []
    for e in model.slots[1].experts:
        e.layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args: rows_seen.append(args[0].shape[:-1].numel())
        )
    ids = torch.randint(1, 380, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        subset = model(ids).logits
        # the reference: every expert's MLP on every token (what a captured graph does)
        from mol.fused import StepContext

        pos = torch.arange(16).expand(2, 16)
        ctx = StepContext(None, torch.ones_like(ids), pos, None, {}, model.rotary, static=True)
        dense = model.step_logits(ids, ctx)
    assert (subset - dense).abs().max() <= 1e-5
    assert sum(rows_seen[:2]) == 32  # top-1: each of the 32 tokens went through exactly one expert's MLP
    assert 0 < rows_seen[0] < 32
    # inserted as hooks: the MLP's own forward is not replaced, and its parameters keep their names
    for e in model.slots[1].experts:
        assert (
            "forward" not in vars(e.layer.mlp)
            and e.layer.mlp._forward_pre_hooks
            and e.layer.mlp._forward_hooks
        )
    assert "slots.1.experts.1.layer.mlp.down_proj.weight" in model.state_dict()


def test_routed_slot_gradients_match_dense(tiny):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    recipe = mol.Recipe.from_dict(
        {
            "name": "r",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": ["a:0", {"experts": ["a:1", "b:1"]}, "a:2"],
        }
    )
    model = mol.build(recipe, device="cpu")
    torch.nn.init.normal_(model.slots[1].router.proj.weight, std=2.0)
    ids = torch.randint(1, 380, (2, 12), generator=torch.Generator().manual_seed(9))
    from mol.fused import StepContext

    grads = []
    for static in (False, True):
        model.zero_grad()
        pos = torch.arange(12).expand(2, 12)
        ctx = StepContext(None, torch.ones_like(ids), pos, None, {}, model.rotary, static=static)
        model.step_logits(ids, ctx).float().pow(2).mean().backward()
        grads.append(model.slots[1].router.proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@cuda
def test_cuda_graph_greedy_tokens_equal_plain(tiny):
    model = mol.build(identity(tiny("llama")), device="cuda", dtype=torch.float32)
    ids, mask = _prompt(2, 7, 10, pad=2)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], fast=False)
    dec = FastDecoder(model, 2, 64, cuda_graph=True)
    for _ in range(2):  # the second call replays the captured graph from its first step
        assert dec.generate(ids, mask, max_new_tokens=20).tolist() == plain.tolist()
