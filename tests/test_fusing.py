"""Fused kernels (mol.network.fusing): a source layer's projections of one input run as one matrix product and its
RMSNorms as one F.rms_norm, with the same tensors, and the model's outputs stay those of the layers as their
families wrote them. Checked on the CPU with `devices=("cpu",)` (by default only CUDA layers are fused)."""

import copy
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mol
from mol.compiling import compile_network, uncompile_network
from mol.fast import FastDecoder
from mol.network.fusing import RMS_FORMS, FusedLinear, FusedRMSNorm, ProjectionGroup, fused_norm, rms_form
from tests.test_more_families import _identity, _source
from tests.tiny_models import identity_recipe

CPU = ("cpu",)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class MatmulCount(TorchDispatchMode):
    """Counts the matrix products the dispatcher runs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _pair(recipe, dtype=torch.float32):
    """The same recipe built twice: as built, and with its kernels fused."""
    plain = mol.build(recipe, device="cpu", dtype=dtype)
    fused = mol.build(recipe, device="cpu", dtype=dtype)
    fused.fuse_kernels(CPU)
    return plain, fused


def _groups(model) -> list[ProjectionGroup]:
    seen = {id(m.group): m.group for m in model.modules() if isinstance(m, FusedLinear)}
    return list(seen.values())


def _ids(bsz=2, q=9, seed=1):
    return torch.randint(1, 380, (bsz, q), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "family, groups, norms",
    [("llama", 8, 9), ("qwen2", 8, 9), ("qwen3", 8, 17), ("mistral", 8, 9), ("phi", 4, 0), ("opt", 4, 0)],
)
def test_fused_identity_equals_the_layers_as_written_with_fewer_products(tiny, family, groups, norms):
    plain, fused = _pair(identity_recipe(tiny(family)))
    assert len(_groups(fused)) == groups  # q/k/v (and gate/up) of each of the 4 layers
    assert sum(1 for m in fused.modules() if isinstance(m, FusedRMSNorm)) == norms
    ids = _ids()
    with torch.no_grad(), MatmulCount() as before:
        want = plain(ids).logits
    with torch.no_grad(), MatmulCount() as after:
        got = fused(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    per_layer = 3 if groups == 8 else 2  # one product instead of 3 + 2, or of 3
    assert before.count - after.count == 4 * per_layer
    kwargs = dict(max_new_tokens=10, eos_token_id=[], fast=False)
    assert fused.generate(ids, **kwargs).tolist() == plain.generate(ids, **kwargs).tolist()
    # and the fast decoder on the fused layers
    fast = FastDecoder(fused, 2, 19).generate(ids, torch.ones_like(ids), max_new_tokens=10)
    assert fast.tolist() == plain.generate(ids, **kwargs).tolist()


def test_the_members_are_views_of_one_weight_and_state_is_unchanged(tiny):
    plain, fused = _pair(identity_recipe(tiny("qwen2")))  # q/k/v with biases
    for group in _groups(fused):
        base = group.weight.untyped_storage().data_ptr()
        assert all(m.weight.untyped_storage().data_ptr() == base for m in group.members)  # no second copy
        if group.bias is not None:  # q/k/v; the MLP's gate and up have none
            bias = group.bias.untyped_storage().data_ptr()
            assert all(m.bias.untyped_storage().data_ptr() == bias for m in group.members)
    assert any(group.bias is not None for group in _groups(fused))
    theirs, ours = plain.state_dict(), fused.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert sorted(fused.trainable_state_dict()) == sorted(plain.trainable_state_dict())
    twin = copy.deepcopy(fused)  # a copy's members take their slices of its own group's product
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    ours_ptrs = {g.weight.data_ptr() for g in _groups(fused)}
    assert not ours_ptrs & {g.weight.data_ptr() for g in _groups(twin)}
    assert all(m.group.members[m.index] is m for m in twin.modules() if isinstance(m, FusedLinear))


def test_fusing_skips_fused_layers_and_the_cpu_by_default(tiny):
    model = mol.build(identity_recipe(tiny("llama")), device="cpu")
    # building and generating fuse where it pays: CUDA
    model.generate(_ids(), max_new_tokens=2, eos_token_id=[])
    model.generate(_ids(), max_new_tokens=2, eos_token_id=[], fast=True)
    assert not _groups(model)
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    model.fuse_kernels(CPU)
    groups = _groups(model)
    assert len(groups) == 8
    model.fuse_kernels(CPU)  # fused layers are left as they are
    assert _groups(model) == groups
    off = mol.build(identity_recipe(tiny("llama")), device="cpu", fuse_kernels=False)
    off.fuse_kernels(CPU)  # switched off at build
    assert not _groups(off)


def test_replaced_moved_or_training_weights_fall_back_to_each_members_own(tiny):
    plain, fused = _pair(identity_recipe(tiny("llama")))
    ids = _ids()
    q_plain = plain.slots[1].experts[0].layer.self_attn.q_proj
    q_fused = fused.slots[1].experts[0].layer.self_attn.q_proj
    new = torch.randn_like(q_plain.weight)
    for q in (q_plain, q_fused):  # a weight replaced after fusing: the product is made again from it
        q.weight = torch.nn.Parameter(new.clone(), requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    group = q_fused.group
    assert group.weight is not None and torch.equal(group.weight[: new.shape[0]], new)
    assert q_fused.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()

    old = weakref.ref(group.weight)
    for m in (plain, fused):  # converted: the old concatenation is dropped and made again in the new dtype
        m.to(torch.float64)
    gc.collect()
    assert group.weight is None and old() is None  # nothing holds the old tensors' memory
    with torch.no_grad():
        torch.testing.assert_close(fused(ids.long()).logits, plain(ids).logits, rtol=1e-9, atol=1e-9)
    assert group.weight.dtype == torch.float64

    for m in (plain, fused):  # a source layer that trains: gradients reach each member's own weight
        m.slots[2].experts[0].layer.requires_grad_(True)
        m.zero_grad()
        m(ids).logits.float().pow(2).mean().backward()
    for name, p in plain.slots[2].experts[0].layer.named_parameters():
        theirs = fused.slots[2].experts[0].layer.get_parameter(name).grad
        torch.testing.assert_close(theirs, p.grad, rtol=1e-6, atol=1e-9)


def test_a_member_called_on_another_input_gets_its_own_product():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(8, 4).requires_grad_(False), torch.nn.Linear(8, 6).requires_grad_(False)
    want_q, want_k = q.weight.detach().clone(), k.weight.detach().clone()
    group = ProjectionGroup([q, k], CPU)
    q, k = group.members
    assert group.fuse()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(q(x), x @ want_q.T + q.bias)
    torch.testing.assert_close(k(y), y @ want_k.T + k.bias)  # not x's slice
    torch.testing.assert_close(k(x), x @ want_k.T + k.bias)
    torch.testing.assert_close(q(x), x @ want_q.T + q.bias)  # taken twice: made again
    assert group.input is None  # every slice of the last product given: no activation held


def test_routed_slots_and_lanes_fused_equal_as_built(tiny):
    recipe = mol.Recipe.from_dict(
        {
            "name": "routed",
            "base": "l",
            "models": {"l": str(tiny("llama")), "q": str(tiny("qwen2")), "g": str(tiny("gpt2", width=48))},
            "slots": [
                "l:0",
                {"experts": ["l:1", "q:1"], "router": {"type": "token"}},  # gate/up on the chosen tokens only
                {"experts": ["l:2", "g:2", "q:2"], "router": {"type": "token", "top_k": 2}},
                "l:3",
            ],
        }
    )
    plain, fused = _pair(recipe)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a, b in zip(plain.routed_slots, fused.routed_slots, strict=True):
            b.router.proj.weight.copy_(
                a.router.proj.weight.copy_(torch.randn(a.router.proj.weight.shape, generator=g) * 2)
            )
    ids = _ids(3, 11, 4)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)

    from tests.test_fast_lanes import _lanes_model

    a, b = _lanes_model(tiny, "token"), _lanes_model(tiny, "token")
    b.fuse_kernels(CPU)
    assert _groups(b) and isinstance(b.lanes["a"].final_norm, FusedRMSNorm)
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=1e-6, atol=1e-6)


def test_compiled_fused_network_has_no_graph_break(tiny):
    import torch._dynamo.utils as dynamo_utils

    plain, fused = _pair(identity_recipe(tiny("llama")))
    ids = _ids()
    with torch.no_grad():
        want = plain(ids).logits
    dynamo_utils.counters.clear()
    compile_network(fused, backend="aot_eager")
    try:
        with torch.no_grad():
            torch.testing.assert_close(fused(ids).logits, want, rtol=1e-6, atol=1e-6)
    finally:
        uncompile_network(fused)
    assert not dynamo_utils.counters["graph_break"]


def test_training_through_fused_layers_gives_the_gradients_of_the_layers_as_written(tiny):
    """Adapters before and after a wider source's fused layer train as they would through the layer as written,
    eager and compiled (where a training step keeps the separate products)."""
    recipe = mol.Recipe.from_dict(
        {
            "name": "wide",
            "base": "l",
            "models": {"l": str(tiny("llama")), "w": str(tiny("llama", width=96, seed=2))},
            "slots": ["l:0", "w:1", {"experts": ["l:2", "w:2"], "router": {"type": "token"}}, "l:3"],
        }
    )
    plain, fused = _pair(recipe)
    fused.load_state_dict(plain.state_dict())
    ids = _ids(2, 10, 6)

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, trace=False)
        (out.loss + 0.01 * out.aux_loss).backward()
        params = model.trainable_parameters().items()
        return out.loss.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}

    want_loss, want = loss_and_grads(plain)
    assert any(".adapter." in n for n in want)  # through the fused layer to the adapter before it
    for compiled in (False, True):
        if compiled:
            compile_network(fused, backend="aot_eager")
        try:
            loss, grads = loss_and_grads(fused)
        finally:
            uncompile_network(fused)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == want.keys()
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "model_type, form",
    [("olmo2", "scale_before_cast"), ("gemma", "one_plus_weight"), ("smollm3", "scale_after_cast")],
)
def test_each_rms_norm_gets_the_form_its_forward_computes(tmp_path, tokenizer_dir, model_type, form):
    recipe = _identity(_source(tmp_path / model_type, tokenizer_dir, model_type))
    plain = mol.build(recipe, device="cpu", dtype=torch.bfloat16)
    fused = mol.build(recipe, device="cpu", dtype=torch.bfloat16)
    with (
        torch.no_grad()
    ):  # norm weights away from their initial ones (all 1 or all 0), where the forms differ
        for a, b in zip(plain.modules(), fused.modules(), strict=True):
            if type(a).__name__.endswith("RMSNorm"):
                b.weight.copy_(a.weight.copy_(torch.randn(a.weight.shape) * 0.5 + 1.0))
    fused.fuse_kernels(CPU)
    forms = {m.form for m in fused.modules() if isinstance(m, FusedRMSNorm)}
    assert forms == {form}
    ids = _ids(2, 8)
    with torch.no_grad():
        got, want = fused(ids).logits.float(), plain(ids).logits.float()
    assert (
        got - want
    ).abs().max().item() <= 0.05 * want.abs().max().item()  # bf16: a rounding here and there


def test_an_rms_norm_no_form_matches_is_left_as_written():
    class OddRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(16)), 1e-6

        def forward(self, x):  # a mean-centred norm under an RMSNorm name
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    norm = OddRMSNorm()
    assert rms_form(norm) is None and fused_norm(norm, CPU) is norm
    assert fused_norm(norm, CPU) is norm  # (and not probed again)
    assert set(RMS_FORMS) == {"scale_after_cast", "scale_before_cast", "one_plus_weight"}


@cuda
def test_cuda_fused_graph_decode_equals_the_unfused_plain_path(tiny):
    recipe = identity_recipe(tiny("llama"))
    unfused = mol.build(recipe, device="cuda", dtype=torch.float32, fuse_kernels=False)
    fused = mol.build(recipe, device="cuda", dtype=torch.float32)
    ids = _ids().cuda()
    want = unfused.generate(ids, max_new_tokens=16, eos_token_id=[], fast=False)
    dec = FastDecoder(fused, 2, 25, cuda_graph=True)
    assert (
        _groups(fused)
        and dec.generate(ids, torch.ones_like(ids), max_new_tokens=16).tolist() == want.tolist()
    )
