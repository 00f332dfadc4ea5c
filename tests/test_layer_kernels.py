"""mol.network.rotary and mol.network.gated_mlp, and their kernels: an attention layer and a gated MLP of the
Llama form, each swapped for a subclass of its own class, keep their names, state, outputs and hooks, and run
transformers' rotary embedding with the cache's write, and silu(gate) * up, in one kernel each.

The kernels are checked against transformers' and torch's own operations on CUDA and in Triton's interpreter on
the CPU; the modules' logic (which modules are swapped, which calls take a kernel, the static cache's buffers)
on the CPU also where Triton is absent, with the kernels' functions computed by torch's and transformers'
operations."""

import copy
import io

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import mol
from mol.fast import FastDecoder
from mol.network import attention, kernels
from mol.network.fusing import RMS_FORMS, _rms_kernel
from mol.network.gated_mlp import Gated, fused_mlp
from mol.network.rotary import Rotary, fused_attention
from tests.test_kernels import in_the_interpreter, interpreter
from tests.test_more_families import _identity, _source
from tests.tiny_models import identity_recipe

CPU = ("cpu",)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (dtype, [B, T, query heads, key-value heads, head size]): grouped queries, one token, odd sizes
ROTARY_SHAPES = [
    ("float32", (2, 3, 4, 2, 16)),
    ("bfloat16", (1, 5, 6, 3, 12)),
    ("bfloat16", (2, 1, 32, 4, 64)),
    ("float16", (3, 2, 2, 2, 8)),
]


def _qkv(dtype, shape, device):
    """q, k, v as views of one projection's output (as a fused q/k/v product gives them), and cos, sin."""
    b, t, h, kvh, d = shape
    g = torch.Generator().manual_seed(t)
    qkv = (torch.randn(b, t, (h + 2 * kvh) * d, generator=g) * 2).to(getattr(torch, dtype)).to(device)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], -1)
    angles = torch.rand(1, t, d, generator=g) * 40
    cos, sin = (f(angles).to(qkv.dtype).to(device) for f in (torch.cos, torch.sin))
    return q.view(b, t, h, d), k.view(b, t, kvh, d), v.view(b, t, kvh, d), cos, sin


def _reference(q, k, cos, sin):
    """transformers' rotation, [B, T, heads, D]."""
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


def _reference_into(q, k, v, cos, sin, keys, values, write):
    """transformers' rotation and a static cache's update (index_copy at `write`): q rotated."""
    q, k = _reference(q, k, cos, sin)
    keys.index_copy_(2, write, k.transpose(1, 2))
    values.index_copy_(2, write, v.transpose(1, 2))
    return q


def _units(got, want):
    """The largest difference in units of the dtype's rounding at the largest value of each head (a sum of two
    rounded products that nearly cancel is off by their rounding, not by the small result's)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    unit = torch.finfo(want.dtype).eps * want.float().abs().amax(-1, keepdim=True).clamp(min=1e-3)
    return ((got.float() - want.float()).abs() / unit).max().item()


def _rotary_gaps(dtype, shape, device):
    """The kernels' results against transformers', in units: q and k rotated, then into a cache at positions."""
    q, k, v, cos, sin = _qkv(dtype, shape, device)
    (gq, gk), (wq, wk) = kernels.rotate(q, k, cos, sin), _reference(q, k, cos, sin)
    b, t, _, kvh, d = shape
    write = torch.arange(t, device=device) * 2 + 1  # every other position of a capacity of 2t + 3
    got_cache = [torch.zeros(b, kvh, 2 * t + 3, d, dtype=q.dtype, device=device) for _ in range(2)]
    want_cache = [c.clone() for c in got_cache]
    gq2 = kernels.rotate_into(q, k, v, cos, sin, *got_cache, write)
    wq2 = _reference_into(q, k, v, cos, sin, *want_cache, write)
    assert torch.equal(got_cache[1], want_cache[1])  # the values: copied as they are
    return [_units(gq, wq), _units(gk, wk), _units(gq2, wq2), _units(got_cache[0], want_cache[0])]


@cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype,shape", ROTARY_SHAPES)
def test_the_rotary_kernels_equal_transformers_on_cuda(dtype, shape):
    # Each product rounded, then their sum, as torch's operations do; yet on CUDA some results come a unit off
    # torch's in half precision (about a quarter of them, in a probe of a million), and float32 fuses a product
    assert max(_rotary_gaps(dtype, shape, "cuda")) <= (1.0 if dtype != "float32" else 2.0)


@pytest.fixture
def torch_kernels(monkeypatch):
    """The kernels available on every device, their rotary functions computed by transformers' operations."""
    monkeypatch.setattr(kernels, "available", lambda device: True)
    monkeypatch.setattr(
        kernels, "runs_on", lambda device: not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    )
    calls = []
    monkeypatch.setattr(kernels, "rotate", lambda *a: calls.append("rotate") or _reference(*a))
    monkeypatch.setattr(kernels, "rotate_into", lambda *a: calls.append("into") or _reference_into(*a))
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps, form: RMS_FORMS[form](x, w, eps, _rms_kernel))
    monkeypatch.setattr(attention, "decode_attention", _attention_reference)
    monkeypatch.setattr(
        kernels, "silu_mul", lambda g, u: calls.append("silu") or torch.nn.functional.silu(g) * u
    )
    return calls


def _attention_reference(rows, key, value, mask, scale):
    mask = mask[:, :, :1, : key.shape[2]]
    return torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scale)


def _attentions(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def _ids(bsz=2, q=9, seed=1):
    return torch.randint(1, 380, (bsz, q), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_swapped_attention_keeps_names_state_and_outputs(tiny, torch_kernels, family):
    recipe = identity_recipe(tiny(family))
    plain = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
    fused = mol.build(recipe, device="cpu", dtype=torch.float32)
    fused.fuse_kernels(CPU)
    swapped = _attentions(fused)
    assert len(swapped) == 4 and all(isinstance(m, Rotary) for m in swapped)
    assert all(isinstance(m, type(p)) for m, p in zip(swapped, _attentions(plain), strict=True))
    theirs, ours = plain.state_dict(), fused.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ids = _ids()
    torch_kernels.clear()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    assert torch_kernels == ["rotate", "silu"] * 4  # no cache: the rotation alone
    kwargs = dict(max_new_tokens=8, eos_token_id=[], fast=False)
    want = plain.generate(ids, **kwargs).tolist()
    torch_kernels.clear()
    assert fused.generate(ids, **kwargs).tolist() == want  # the plain path: rotated before its cache's update
    assert torch_kernels == ["rotate", "silu"] * 4 * 8
    torch_kernels.clear()
    assert FastDecoder(fused, 2, 17).generate(ids, max_new_tokens=8).tolist() == want
    # the prompt and each step: straight into the static cache
    assert torch_kernels == ["into", "silu"] * 4 * 8


def test_gradients_and_compiling_take_the_layers_own_forward(tiny, torch_kernels):
    recipe = identity_recipe(tiny("llama"))
    plain = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
    fused = mol.build(recipe, device="cpu", dtype=torch.float32)
    fused.fuse_kernels(CPU)
    assert all(isinstance(m, Rotary) for m in _attentions(fused))
    ids = _ids()
    torch_kernels.clear()
    want = plain(ids).logits.square().mean()
    got = fused(ids).logits.square().mean()
    assert not torch_kernels  # a gradient wanted: transformers' operations, which have one
    torch.testing.assert_close(got, want)
    compiled = torch.compile(fused.forward, backend="eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, plain(ids).logits.detach(), rtol=1e-6, atol=1e-6)
    assert not torch_kernels


@pytest.mark.parametrize("model_type", ["olmo2", "smollm3"])
def test_attention_of_another_form_is_left_as_written(tmp_path, tokenizer_dir, torch_kernels, model_type):
    """OLMo 2 norms q and k over all heads at once; SmolLM3 leaves the rotation out of some layers: the probe
    finds the kernel's forward otherwise there, and the module stays as it is."""
    extra = {"no_rope_layers": [1, 0, 1]} if model_type == "smollm3" else {}
    recipe = _identity(_source(tmp_path / model_type, tokenizer_dir, model_type, **extra))
    model = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
    plain = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
    layers = [e.layer for s in model.slots for e in s.experts]
    for layer in layers:
        layer.self_attn = fused_attention(layer.self_attn)
    rotating = [isinstance(layer.self_attn, Rotary) for layer in layers]
    if model_type == "olmo2":
        assert not any(rotating)
    else:  # its layers with no rotation stay; those with one rotate
        assert rotating == [bool(layer.self_attn.use_rope) for layer in layers] == [True, False, True]
    ids = _ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)


def test_nothing_is_swapped_where_the_kernels_cannot_run(tiny):
    model = mol.build(identity_recipe(tiny("llama")), device="cpu")
    model.fuse_kernels(CPU)
    assert not any(isinstance(m, Rotary) for m in model.modules())


@interpreter
def test_the_rotary_kernels_equal_transformers_in_the_triton_interpreter():
    """The kernels' arithmetic on the CPU, in Triton's interpreter (chosen before a kernel is defined, so in a
    process of its own), and a fast decoder on them giving the plain path's tokens."""
    script = """
        import torch
        from tests.test_layer_kernels import ROTARY_SHAPES, _rotary_gaps
        for dtype, shape in ROTARY_SHAPES:  # (the interpreter rounds half precision by truncation: a unit a rounding)
            gaps = _rotary_gaps(dtype, shape, "cpu")
            assert max(gaps) <= 3.0, (dtype, shape, gaps)
        import tempfile
        from pathlib import Path
        import mol
        from mol.fast import FastDecoder
        from mol.network import attention, kernels
        from mol.network.rotary import Rotary
        from tests.test_layer_kernels import _ids
        from tests.tiny_models import identity_recipe, make_model, make_tokenizer
        kernels.available = lambda device: True  # the interpreter runs them on CPU tensors
        kernels.runs_on = lambda device: not torch.is_grad_enabled()
        with tempfile.TemporaryDirectory() as root:
            folder = make_model(Path(root, "m"), "qwen3", 64, 4, make_tokenizer(Path(root, "tokenizer")))
            recipe = identity_recipe(folder)
            plain = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
            fused = mol.build(recipe, device="cpu", dtype=torch.float32)
            fused.fuse_kernels(("cpu",))
            assert sum(isinstance(m, Rotary) for m in fused.modules()) == 4
            ids = _ids()
            want = plain.generate(ids, max_new_tokens=8, eos_token_id=[], fast=False).tolist()
            assert FastDecoder(fused, 2, 17).generate(ids, max_new_tokens=8).tolist() == want
            assert fused.generate(ids, max_new_tokens=8, eos_token_id=[], fast=False).tolist() == want
        print("ok", len(ROTARY_SHAPES))
        """
    assert in_the_interpreter(script) == ["ok", str(len(ROTARY_SHAPES))]


@cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_cuda_graph_decode_on_swapped_layers_equals_the_unfused_plain_path(tiny, family):
    recipe = identity_recipe(tiny(family))
    unfused = mol.build(recipe, device="cuda", dtype=torch.float32, fuse_kernels=False)
    fused = mol.build(recipe, device="cuda", dtype=torch.float32)
    fused.fuse_kernels()
    assert sum(isinstance(m, Rotary) for m in fused.modules()) == 4
    assert sum(isinstance(m, Gated) for m in fused.modules()) == 4
    ids = _ids().cuda()
    want = unfused.generate(ids, max_new_tokens=16, eos_token_id=[], fast=False)
    got = FastDecoder(fused, 2, 25, cuda_graph=True).generate(ids, torch.ones_like(ids), max_new_tokens=16)
    assert got.tolist() == want.tolist()
    assert fused.generate(ids, max_new_tokens=16, eos_token_id=[], fast=False).tolist() == want.tolist()


# ---- gated MLPs ------------------------------------------------------------------------------------------------
# (dtype, [rows..., width]): halves of one fused product, a width over several of the kernel's blocks
SILU_SHAPES = [("bfloat16", (2, 3, 96)), ("float32", (1, 5, 3000)), ("float16", (4, 1, 17))]


def _silu_gap(dtype, shape, device):
    """The kernel against torch's silu(gate) * up on the two halves of one product, in units of the dtype's
    rounding at each value."""
    g = torch.Generator().manual_seed(shape[-1])
    both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(getattr(torch, dtype)).to(device)
    gate, up = both.split(shape[-1], -1)
    want = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul(gate, up)
    assert got.dtype == want.dtype and got.shape == want.shape
    unit = torch.finfo(want.dtype).eps * want.float().abs().clamp(min=1e-3)
    return ((got.float() - want.float()).abs() / unit).max().item()


@cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype,shape", SILU_SHAPES)
def test_the_silu_kernel_equals_torch_on_cuda(dtype, shape):
    # float32: Triton's exp is the GPU's approximate one (4.4 units off torch's, measured on an H200); half
    # precision: one rounding after it
    assert _silu_gap(dtype, shape, "cuda") <= (8.0 if dtype == "float32" else 1.0)


@interpreter
def test_the_silu_kernel_equals_torch_in_the_triton_interpreter():
    script = """
        from tests.test_layer_kernels import SILU_SHAPES, _silu_gap
        for dtype, shape in SILU_SHAPES:  # (the interpreter rounds half precision by truncation)
            assert _silu_gap(dtype, shape, "cpu") <= (4.0 if dtype == "float32" else 2.0), (dtype, shape)
        print("ok", len(SILU_SHAPES))
        """
    assert in_the_interpreter(script) == ["ok", str(len(SILU_SHAPES))]


def test_a_routed_slot_runs_its_experts_gated_mlps_on_their_tokens(tiny, torch_kernels):
    recipe = mol.Recipe.from_dict(
        {
            "name": "routed",
            "base": "l",
            "models": {"l": str(tiny("llama")), "q": str(tiny("qwen2"))},
            "slots": ["l:0", {"experts": ["l:1", "q:1"], "router": {"type": "token"}}, "l:2", "l:3"],
        }
    )
    plain = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
    fused = mol.build(recipe, device="cpu", dtype=torch.float32, fuse_kernels=False)
    with torch.no_grad():
        for a, b in zip(plain.routed_slots, fused.routed_slots, strict=True):
            w = torch.randn(a.router.proj.weight.shape, generator=torch.Generator().manual_seed(3)) * 2
            a.router.proj.weight.copy_(w)
            b.router.proj.weight.copy_(w)
    fused.kernel_fusion = True
    fused.fuse_kernels(CPU)
    mlps = [m for m in fused.modules() if type(m).__name__.endswith("MLP")]
    assert len(mlps) == 5 and all(isinstance(m, Gated) for m in mlps)
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = _ids(3, 11, 4)
    rows = []
    slot = fused.routed_slots[0]
    expert_mlp = slot.experts[1].layer.mlp
    expert_mlp.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    torch_kernels.clear()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    assert torch_kernels.count("silu") == 5
    assert 0 < rows[0] < 3 * 11  # the TokenSubset hook still hands the MLP only its chosen tokens


def test_an_mlp_of_another_activation_is_left_as_written(tmp_path, tokenizer_dir, torch_kernels):
    model = mol.build(
        _identity(_source(tmp_path / "g", tokenizer_dir, "llama", hidden_act="gelu")),
        device="cpu",
        dtype=torch.float32,
        fuse_kernels=False,
    )
    mlps = [e.layer.mlp for s in model.slots for e in s.experts]
    assert all(fused_mlp(m) is m for m in mlps)


def test_swapped_modules_copy_and_pickle_as_their_subclass(tiny, torch_kernels):
    model = mol.build(identity_recipe(tiny("llama")), device="cpu", dtype=torch.float32)
    model.fuse_kernels(CPU)
    layer = model.slots[0].experts[0].layer
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert type(twin.self_attn) is type(layer.self_attn) and isinstance(twin.self_attn, Rotary)
        assert type(twin.mlp) is type(layer.mlp) and isinstance(twin.mlp, Gated)
        assert twin.mlp.up_proj.weight.data_ptr() != layer.mlp.up_proj.weight.data_ptr()
        x = torch.randn(2, 3, 64)
        with torch.no_grad():
            torch.testing.assert_close(twin.mlp(x), layer.mlp(x), rtol=0, atol=0)


def test_a_module_whose_probe_fails_to_run_keeps_its_forward(tiny, torch_kernels):
    model = mol.build(identity_recipe(tiny("llama")), device="cpu", dtype=torch.float32, fuse_kernels=False)
    attn = model.slots[0].experts[0].layer.self_attn

    class Picky(type(attn)):  # a forward that takes another argument than transformers' does
        def forward(self, hidden_states, position_embeddings, attention_mask, extra, **kwargs):
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)

    picky = Picky.__new__(Picky)
    picky.__dict__.update(attn.__dict__)
    assert fused_attention(picky) is picky
    assert isinstance(fused_attention(attn), Rotary)  # the module as transformers wrote it
