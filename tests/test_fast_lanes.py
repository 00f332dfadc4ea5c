"""The fast decoder on lanes recipes: each lane its own static caches, the output mixture's state (a per-sequence
decision, the evidence so far, the last distributions) in fixed buffers written in place, the lanes on their own
streams on CUDA. Its tokens and trace are the plain path's, for every kind of mixture."""

import pytest
import torch

import mol
from mol.fast import FastDecoder
from mol.network.routers import EvidenceGate, keep_state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _lanes_model(tiny, mixture, stitches=(), device="cpu", routed=False):
    models = {"l": str(tiny("llama", width=64)), "g": str(tiny("gpt2", width=48)), "q": str(tiny("qwen2"))}
    lanes = {
        "a": {"base": "l"},
        "b": {
            "base": "g",
            "slots": ["g:0", {"experts": ["g:1", "q:1"]}, "g:2"] if routed else ["g:0", "g:2"],
        },
    }
    recipe = mol.Recipe.from_dict(
        {"name": "lanes", "models": models, "lanes": lanes, "stitches": list(stitches), "mixture": mixture}
    )
    model = mol.build(recipe, device=device, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a gate and routers that really switch, stitches that act
        for p in [*model.gate.parameters(), *(s.router.proj.weight for s in model.routed_slots)]:
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 if p.dim() > 1 else 0.5))
        for st in model.stitches:
            st.gate.fill_(0.4)
    return model


def _prompt(device="cpu"):
    ids = torch.randint(1, 380, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0  # left padding in the last sequence
    return ids.to(device), mask.to(device)


def _same(fast, plain):
    assert fast.sequences.tolist() == plain.sequences.tolist()
    assert [(s.slot, s.router, s.experts) for s in fast.trace.slots] == [
        (s.slot, s.router, s.experts) for s in plain.trace.slots
    ]
    for a, b in zip(fast.trace.slots, plain.trace.slots, strict=True):
        assert a.probs.shape == b.probs.shape
        assert torch.equal(a.chosen, b.chosen)
        assert (a.probs - b.probs).abs().max() <= 1e-5
    assert torch.equal(fast.trace.attention_mask, plain.trace.attention_mask)


@pytest.mark.parametrize("mixture", ["token", "sequence", "evidence"])
def test_fast_lanes_tokens_and_trace_equal_plain(tiny, mixture):
    model = _lanes_model(tiny, mixture, stitches=[{"from": "a", "to": "b", "after": [1, 0]}], routed=True)
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=[], return_trace=True)
    plain = model.generate(ids, fast=False, **kw)
    for _ in range(2):  # a second call reuses the decoder and its buffers
        _same(model.generate(ids, fast=True, **kw), plain)
    assert plain.trace.slots[-1].slot == -1  # the mixture's row, last, as the plain path has it


def test_fast_lanes_sampling_equals_plain_with_one_generator(tiny):
    model = _lanes_model(tiny, "evidence")
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=20)
    plain = model.generate(ids, fast=False, generator=torch.Generator().manual_seed(9), **kw)
    fast = model.generate(ids, fast=True, generator=torch.Generator().manual_seed(9), **kw)
    assert fast.tolist() == plain.tolist()


def test_cross_attention_stitches_keep_to_the_plain_path(tiny):
    st = {"from": "a", "to": "b", "after": [1, 0], "type": "cross-attention"}
    model = _lanes_model(tiny, "evidence", stitches=[st])
    with pytest.raises(ValueError, match="cross-attention"):
        FastDecoder(model, 3, 32)
    ids, mask = _prompt()
    model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])  # the default still decodes


def test_gate_state_is_written_in_place():
    """A captured step reads and writes fixed buffers: the gate's evidence must land in the one already there."""
    gate = EvidenceGate(8, 2)
    state = {}
    gate(torch.randn(1, 4, 2), None, state)
    buffer = state["evidence"]
    with torch.no_grad():
        after = gate(torch.randn(1, 1, 2), None, state)
    assert state["evidence"] is buffer and torch.allclose(buffer, after[:, -1], atol=1e-6)  # prior 0, scale 1
    keep_state(state, "evidence", torch.zeros(2, 2))  # another shape: a new tensor
    assert state["evidence"] is not buffer


@cuda
@pytest.mark.parametrize("mixture", ["token", "evidence"])
def test_cuda_graph_lanes_on_their_streams_equal_plain(tiny, mixture):
    model = _lanes_model(tiny, mixture, stitches=[{"from": "a", "to": "b", "after": [1, 0]}], device="cuda")
    ids, mask = _prompt("cuda")
    kw = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=[], return_trace=True)
    plain = model.generate(ids, fast=False, **kw)
    dec = FastDecoder(model, 3, 64, cuda_graph=True)
    assert dec.streams is not None and len(dec.streams) == 2
    for _ in range(2):  # the second call replays the captured graph from its first step
        out = dec.generate(ids, mask, max_new_tokens=16, return_trace=True)
        _same(out, plain)
    assert model.generate(ids, **kw).sequences.tolist() == plain.sequences.tolist()  # the default: fast
