"""A routed slot's arithmetic against a hand computation: the router's features, the top-k weights (top-1 is
1 in value with the straight-through gradient), and the slot's output as the weighted sum of its experts."""

import pytest
import torch

import mol
from mol.fused import StepContext
from mol.network.routers import TokenRouter, route, unit_rms


def test_unit_rms_is_the_formula():
    h = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 7
    x = h.float()
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    got = unit_rms(h)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_top1_weight_is_one_with_the_straight_through_gradient(grad):
    torch.manual_seed(0)
    router = TokenRouter(16, 3, top_k=1)
    torch.nn.init.normal_(router.proj.weight, std=2.0)
    h = torch.randn(2, 4, 16)
    c = torch.randn(2, 4, 1)
    with torch.set_grad_enabled(grad):
        r = route(router, h, None, None)
    assert torch.equal(r.weights, torch.ones(2, 4, 1))  # exactly 1, not 1 +- an ulp
    top, chosen = r.probs.topk(1, dim=-1)
    assert torch.equal(chosen, r.chosen)
    if not grad:
        assert not r.weights.requires_grad
        return
    (r.weights * c).sum().backward()
    got = router.proj.weight.grad.clone()
    router.zero_grad()
    # straight-through: the loss reaches the router as if the weight were the chosen expert's probability
    logits = router.proj(unit_rms(h))
    (logits.softmax(-1).gather(-1, chosen) * c).sum().backward()
    assert torch.allclose(got, router.proj.weight.grad, atol=1e-6)


def test_topk_weights_renormalised():
    torch.manual_seed(1)
    router = TokenRouter(16, 4, top_k=2)
    torch.nn.init.normal_(router.proj.weight, std=2.0)
    r = route(router, torch.randn(2, 5, 16), None, None)
    top = r.probs.gather(-1, r.chosen)
    assert torch.allclose(r.weights, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("grad", [False, True])  # top-1 without gradient selects; with one it weights by 1
def test_slot_output_is_the_weighted_sum_of_its_experts(tiny, top_k, static, grad):
    recipe = mol.Recipe.from_dict(
        {
            "name": "mix",
            "base": "a",
            "models": {
                "a": str(tiny("llama", seed=0)),
                "b": str(tiny("llama", seed=1)),
                "c": str(tiny("qwen2")),
            },
            "slots": ["a:0", {"experts": ["a:1", "b:1", "c:1"], "router": {"type": "token", "top_k": top_k}}],
        }
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    slot = model.slots[1]
    torch.nn.init.normal_(slot.router.proj.weight, std=2.0)
    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(9).expand(2, 9)
    with torch.set_grad_enabled(grad):
        ctx = StepContext(
            None, torch.ones(2, 9, dtype=torch.long), pos, None, {}, model.rotary, static=static
        )
        got = slot(h, ctx)
        r = ctx.routings[0][1]
    assert r.weights.requires_grad == grad
    with torch.no_grad():
        assert len(set(r.chosen[..., 0].flatten().tolist())) > 1  # the tokens really go different ways
        want = torch.zeros_like(h)
        for i, expert in enumerate(slot.experts):
            dense = StepContext(None, ctx.mask2d, pos, None, {}, model.rotary, static=True)
            w = (r.weights * (r.chosen == i)).sum(-1, keepdim=True)  # 0 where expert i was not chosen
            want += w * expert(h, dense)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_adds_its_update(dtype):
    from mol.network.adapters import BottleneckAdapter, LinearAdapter

    torch.manual_seed(2)
    for adapter in (LinearAdapter(32, 24), BottleneckAdapter(32, 24, rank=4)):
        for p in adapter.parameters():
            torch.nn.init.normal_(p, std=0.3)
        adapter.to(dtype)
        h, delta = torch.randn(2, 5, 32, dtype=dtype), torch.randn(2, 5, 24, dtype=dtype)
        want = h.float() + adapter.out(delta).float()
        got = adapter.add_out(h, delta)
        assert got.shape == h.shape and got.dtype == dtype
        assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 0.1, rtol=0.02)
