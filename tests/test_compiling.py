"""Regional compilation (mol.compiling) gives the eager model's logits and gradients, routed slots included, and
the per-expert token rows come from one grouping of the choices."""

import os
import shutil

import pytest
import torch

import mol
from mol.compiling import compile_blocks, compile_network, uncompile_network, use_compile_cache
from mol.network.modeling_mol import rows_by_expert as _rows_by_expert


def _routed(tiny):
    recipe = mol.Recipe.from_dict(
        {
            "name": "cross",
            "base": "l",
            "models": {
                "l": str(tiny("llama", width=64)),
                "g": str(tiny("gpt2", width=96)),
                "n": str(tiny("gpt_neox", width=48, layers=2)),
            },
            "slots": [
                "l:0",
                {"experts": ["l:1", "g:1"]},
                {"experts": ["l:2", "n:0", "g:2"], "router": {"type": "token", "top_k": 2}},
                {"experts": ["l:3", "n:1"], "router": {"type": "pooled"}},
            ],
        }
    )
    model = mol.build(recipe, device="cpu")
    torch.manual_seed(0)
    for slot in model.routed_slots:
        torch.nn.init.normal_(slot.router.proj.weight, std=2.0)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, trace=False)  # as in training: no host copies of the routing
    (out.loss + 0.01 * out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.trainable_parameters().items() if p.grad is not None}
    return out.logits.detach(), grads


def test_compiled_blocks_match_eager_logits_and_gradients(tiny):
    model = _routed(tiny)
    batches = [torch.randint(1, 380, (2, 11), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    batches.append(torch.randint(1, 380, (3, 7), generator=torch.Generator().manual_seed(3)))
    eager = [_loss_and_grads(model, ids) for ids in batches]
    compile_blocks(model, backend="aot_eager")  # the graph capture and replay, without needing a C++ compiler
    assert not any(s.router._compiled_call_impl is not None for s in model.routed_slots)
    compile_blocks(model, backend="aot_eager", routers=True)  # idempotent for the blocks; routers now too
    assert all(b.layer._compiled_call_impl is not None for s in model.slots for b in s.experts)
    assert all(s.router._compiled_call_impl is not None for s in model.routed_slots)
    for ids, (logits, grads) in zip(
        batches, eager, strict=True
    ):  # routed MLPs see other token counts in every batch
        c_logits, c_grads = _loss_and_grads(model, ids)
        torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
        assert c_grads.keys() == grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    plain = model.generate(batches[0], max_new_tokens=5, eos_token_id=[], fast=False)
    assert plain.shape == (2, 16)


def test_rows_by_expert_groups_every_choice_once():
    chosen = torch.tensor([[[0, 2], [1, 0], [2, 1]], [[0, 1], [2, 0], [0, 2]]])  # [B=2, T=3, k=2]
    rows = _rows_by_expert(chosen, 4)
    flat = chosen.reshape(-1, 2)
    for i in range(4):
        expected = (flat == i).any(-1).nonzero().squeeze(1)
        assert rows[i].tolist() == expected.tolist()
    assert rows[3].numel() == 0


def test_compiled_network_matches_eager_and_breaks_only_at_routing(tiny):
    import torch._dynamo.utils as dynamo_utils

    model = _routed(tiny)
    batches = [
        torch.randint(1, 380, (2, 9 + s), generator=torch.Generator().manual_seed(s)) for s in range(3)
    ]
    eager = [_loss_and_grads(model, ids) for ids in batches]
    dynamo_utils.counters.clear()
    compile_network(model, backend="aot_eager")
    for ids, (logits, grads) in zip(batches, eager, strict=True):
        c_logits, c_grads = _loss_and_grads(model, ids)
        torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    reasons = list(dynamo_utils.counters["graph_break"])  # where the host learns each expert's token count
    assert reasons and all("bincount" in r or "_local_scalar_dense" in r for r in reasons), reasons
    uncompile_network(model)
    assert model.compiled_step_logits is None
    torch.testing.assert_close(_loss_and_grads(model, batches[0])[0], eager[0][0], rtol=1e-5, atol=1e-5)


def test_the_compile_cache_goes_to_a_folder_that_outlives_the_process(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("MOL_COMPILE_CACHE", str(tmp_path / "default"))
    assert use_compile_cache() == tmp_path / "default"  # no folder, none set: mol's default
    assert (tmp_path / "default").is_dir()
    assert use_compile_cache(tmp_path / "mine") == tmp_path / "mine"  # an explicit folder wins
    assert use_compile_cache() == tmp_path / "mine"  # then stays (torch reads it at each cache access)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "mine").resolve())


def test_compiled_routed_experts_run_their_mlp_on_their_tokens_only(tiny):
    """A plain slot's layer and routed experts' layers of the same class each keep their own compiled graph: the
    experts' token-subset hooks are not dropped for the graph the plain layer compiled first."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()  # no graph of an earlier test stands in for these layers
    recipe = mol.Recipe.from_dict(
        {
            "name": "plain-then-routed",
            "base": "a",
            "models": {"a": str(tiny("llama", seed=0)), "b": str(tiny("llama", seed=1))},
            "slots": ["a:0", {"experts": ["a:1", "b:1"]}],
        }
    )
    model = mol.build(recipe, device="cpu")
    torch.nn.init.normal_(model.slots[1].router.proj.weight, std=2.0)
    ids = torch.randint(1, 380, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
        compile_blocks(model, backend="aot_eager")
        for _ in range(2):
            got = model(ids).logits
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = model(ids, trace=True)
    assert torch.allclose(got, want, atol=1e-5)
    counts = torch.bincount(out.trace.slots[0].chosen.flatten(), minlength=2).tolist()
    assert 0 < min(counts)
    inner = model.slots[0].experts[0].layer.mlp.down_proj.weight.shape[1]
    rows = sorted(  # the M of every down projection: B * T for the plain layer, each expert's own tokens
        s[0][0]
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::mm"
        for s in [e.input_shapes] * e.count
        if len(s) >= 2 and len(s[0]) == 2 and s[0][1] == inner
    )
    assert rows == sorted([32, *counts])


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(
                not (shutil.which("c++") or shutil.which("g++")),
                reason="inductor's CPU backend needs a C++ compiler",
            ),
        ),
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
        ),
    ],
)
def test_inductor_compiled_training_step_matches_eager(tiny, device):
    """Inductor itself, beyond the graph capture the other tests check: with gradients on, a routed expert's
    MLP output put back among all tokens, and its layer's residual add after it, give eager's logits, loss and
    gradients (inductor once computed that add from wrong values when the put-back was a scatter)."""
    torch._dynamo.reset()
    recipe = mol.Recipe.from_dict(
        {
            "name": "routed-across-widths",
            "base": "a",
            "models": {"a": str(tiny("llama", width=64)), "w": str(tiny("llama", width=96))},
            "slots": ["a:0", {"experts": ["a:1", "w:1"]}],
        }
    )
    model = mol.build(recipe, device=device, dtype=torch.float32)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.routed_slots[0].router.proj.weight, std=2.0)  # tokens split both ways
    ids = torch.randint(1, 380, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    logits, grads = _loss_and_grads(model, ids)
    compile_network(model)
    c_logits, c_grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(c_logits, logits, rtol=1e-4, atol=1e-4)
    assert c_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-3, atol=1e-5)
    uncompile_network(model)
