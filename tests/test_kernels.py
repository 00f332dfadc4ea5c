"""mol.network.kernels: each Triton kernel computes what the torch operations it stands for compute (the lanes'
mixture: `mix` of their log-softmax; an RMSNorm: its form in RMS_FORMS), on CUDA and, where Triton is
installed, in Triton's interpreter on the CPU; a lanes model and a fused norm on CUDA run them."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mol
from mol.network import kernels, modeling_mol
from mol.network.fusing import RMS_FORMS, FusedRMSNorm, _rms_kernel
from mol.network.mixing import can_fuse, fused_mix, log_normaliser, mix

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _interpreter_version() -> tuple[int, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


# Triton's interpreter before 3.9 cannot run a loop over a runtime bound inside a nested kernel function
interpreter = pytest.mark.skipif(_interpreter_version() < (3, 9), reason="needs Triton 3.9 or later")


def in_the_interpreter(script: str) -> list[str]:
    """The words `script` prints, run in Triton's interpreter (on CPU tensors), which must be chosen before a kernel
    is defined: in a process of its own, from the repository's root."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


# RMSNorm: (form, input dtype, weight dtype, [rows, width])
NORMS = [
    (form, x, w, shape)
    for form in RMS_FORMS
    for x, w, shape in [
        ("bfloat16", "bfloat16", (3, 2048)),
        ("float32", "float32", (5, 96)),
        ("bfloat16", "float32", (2, 1, 100)),
    ]
]

# (lanes, [B, T, V], dtype): one lane, an odd one after a pair, a vocabulary over several of the kernel's blocks
CASES = [
    (2, (2, 3, 100), "bfloat16"),
    (3, (1, 4, 9001), "float32"),
    (1, (2, 2, 50), "float16"),
    (4, (2, 5, 37), "float32"),
]


def _reference(logits, scores):
    names = [str(i) for i in range(len(logits))]
    return mix(
        {n: z.log_softmax(-1, dtype=torch.float32) for n, z in zip(names, logits, strict=True)}, scores, names
    )


def _gap(got, want):
    """The largest difference, where the two agree on which tokens are ruled out (-inf)."""
    assert torch.equal(got.isneginf(), want.isneginf()) and not got.isnan().any()
    return (got - want)[want.isfinite()].abs().max().item()


def _norm_gap(form, x, w, shape, device):
    """The kernel's RMSNorm against the torch form's: the dtype, and the largest difference in units of the
    coarsest rounding the form makes (its input dtype's or its output's) at each value, where float32 rounds
    in steps of 4 units (sums in another order)."""
    g = torch.Generator().manual_seed(len(shape))
    xs = (torch.randn(shape, generator=g) * 3).to(getattr(torch, x)).to(device)
    ws = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(getattr(torch, w)).to(device)
    want = RMS_FORMS[form](xs, ws, 1e-6, _rms_kernel)
    got = kernels.rms_norm(xs, ws, 1e-6, form)
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = max(torch.finfo(want.dtype).eps, torch.finfo(xs.dtype).eps if form == "scale_after_cast" else 0.0)
    unit = eps * want.float().abs().clamp(min=1e-3) * (4 if eps == torch.finfo(torch.float32).eps else 1)
    return ((got.float() - want.float()).abs() / unit).max().item()


def _inputs(lanes, shape, dtype, device):
    g = torch.Generator().manual_seed(lanes)
    logits = [(torch.randn(shape, generator=g) * 4).to(getattr(torch, dtype)) for _ in range(lanes)]
    logits[0][0, 0, : shape[-1] // 3] = float(
        "-inf"
    )  # tokens a lane rules out (another lane still gives them mass)
    scores = torch.randn(*shape[:2], lanes, generator=g)
    return [z.to(device) for z in logits], scores.to(device)


def test_the_kernels_run_only_where_they_can():
    z = [torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)]
    with torch.no_grad():
        assert not can_fuse(z)  # the CPU: torch's operations
    if torch.cuda.is_available() and kernels.triton is not None:
        zc = [t.cuda() for t in z]
        assert not can_fuse(zc)  # gradients wanted: the kernels have no backward
        with torch.no_grad():
            assert can_fuse(zc)
            assert not can_fuse([zc[0], zc[1].transpose(1, 2)])  # of two shapes


@cuda
@pytest.mark.parametrize("lanes,shape,dtype", CASES)
@torch.no_grad()
def test_fused_mix_equals_torch_mix_on_cuda(lanes, shape, dtype):
    logits, scores = _inputs(lanes, shape, dtype, "cuda")
    assert can_fuse(logits)
    want = _reference(logits, scores)
    got = fused_mix(logits, scores)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _gap(got, want) <= 1e-4
    # the last position only, as a view of the whole (what a prompt's last step reads)
    last = [z[:, -1:] for z in logits]
    assert _gap(fused_mix(last, scores[:, -1:]), _reference(last, scores[:, -1:])) <= 1e-4
    for z in logits:
        assert (log_normaliser(z) - torch.logsumexp(z.float(), -1)).abs().max().item() <= 1e-4


@interpreter
def test_fused_mix_equals_torch_mix_in_the_triton_interpreter():
    """The kernel's arithmetic checked on the CPU: Triton's interpreter runs it on CPU tensors (it must be chosen
    before the kernel is defined, so in a process of its own)."""
    script = """
        from tests.test_kernels import CASES, _gap, _inputs, _reference
        import torch
        from mol.network import kernels
        for lanes, shape, dtype in CASES:
            logits, scores = _inputs(lanes, shape, dtype, "cpu")
            gap = _gap(kernels.mix_lanes(logits, scores.log_softmax(-1)), _reference(logits, scores))
            assert gap <= 1e-4, (lanes, shape, dtype, gap)
            z = logits[-1]
            gap = (kernels.log_normalisers(z) - torch.logsumexp(z.float(), -1)).abs().max().item()
            assert gap <= 1e-4, (lanes, shape, dtype, gap)
        from tests.test_kernels import NORMS, _norm_gap
        for case in NORMS:  # (the interpreter rounds to bfloat16 by truncation: up to 2 units in two roundings)
            assert _norm_gap(*case, "cpu") <= 2.0, case
        print("ok", len(CASES))
        """
    assert in_the_interpreter(script) == ["ok", str(len(CASES))]


def _two_lanes(tiny, mixture, device):
    """A two-lane recipe (widths 64 and 48) with a gate that really mixes, in float32, and a batch of ids."""
    models = {"l": str(tiny("llama", width=64)), "g": str(tiny("gpt2", width=48))}
    lanes = {"a": {"base": "l"}, "b": {"base": "g"}}
    recipe = mol.Recipe.from_dict({"name": "lanes", "models": models, "lanes": lanes, "mixture": mixture})
    model = mol.build(recipe, device=device, dtype=torch.float32)
    with torch.no_grad():
        for p in model.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.device))
    return model, torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(2)).to(device)


@cuda
@pytest.mark.parametrize("mixture", ["token", "evidence"])
def test_a_lanes_forward_on_cuda_mixes_in_the_kernel_as_torch_does(tiny, monkeypatch, mixture):
    model, ids = _two_lanes(tiny, mixture, "cuda")
    calls = []
    monkeypatch.setattr(modeling_mol, "fused_mix", lambda *a: calls.append(1) or fused_mix(*a))
    with torch.no_grad():
        got = model(ids).logits
        got_last = model(ids, last_only=True).logits
    assert len(calls) == 2, "the lanes' mixture did not run in the kernel"
    monkeypatch.setattr(modeling_mol, "runs_on", lambda device: False)  # the same through torch's operations
    with torch.no_grad():
        want = model(ids).logits
    assert len(calls) == 2
    assert _gap(got, want) <= 1e-4
    assert _gap(got_last, want[:, -1:]) <= 1e-4


@pytest.mark.parametrize("mixture", ["token", "evidence"])
def test_the_lanes_logits_path_equals_the_log_softmax_path(tiny, monkeypatch, mixture):
    """Where the kernels run, the lanes hand their raw logits on (an evidence gate takes their log-normalisers);
    on the CPU, with torch standing in for the kernels, that path gives the log-softmax path's logits, and the
    same generated tokens (the evidence kept between steps)."""
    model, ids = _two_lanes(tiny, mixture, "cpu")
    with torch.no_grad():
        want = model(ids).logits
    plain = model.generate(ids, max_new_tokens=8, eos_token_id=[], fast=False)
    seen = []
    monkeypatch.setattr(modeling_mol, "runs_on", lambda device: True)
    real_run = type(model).run_lanes
    monkeypatch.setattr(
        type(model), "run_lanes", lambda self, *a, **k: seen.append(k.get("raw")) or real_run(self, *a, **k)
    )
    with torch.no_grad():
        got = model(ids).logits
    assert seen == [True]
    assert _gap(got, want) <= 1e-5
    assert model.generate(ids, max_new_tokens=8, eos_token_id=[], fast=False).tolist() == plain.tolist()


@cuda
@torch.no_grad()
@pytest.mark.parametrize("form,x,w,shape", NORMS)
def test_the_rms_norm_kernel_equals_its_torch_form_on_cuda(form, x, w, shape):
    assert _norm_gap(form, x, w, shape, "cuda") <= 1.0


@cuda
def test_a_fused_norm_runs_the_kernel_only_with_no_gradient_wanted(monkeypatch):
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.rand(64, device="cuda") + 0.5, requires_grad=False)
    fused = FusedRMSNorm(norm, "scale_after_cast", 1e-6)
    real, calls = kernels.rms_norm, []
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    want = RMS_FORMS["scale_after_cast"](x, norm.weight, 1e-6, _rms_kernel)
    got = fused(x)  # gradients wanted: torch's form, whose backward reaches x
    assert not calls and got.requires_grad
    with torch.no_grad():
        got = fused(x)
    assert calls == [1]
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@torch.no_grad()
def test_each_kernel_runs_on_its_tensors_gpu_while_another_is_current():
    """A model placed over two GPUs: its second GPU's layers launch their kernels there (Triton launches on the
    current device, the first)."""
    from tests.test_decode_attention import CASES as ATTENTION
    from tests.test_decode_attention import _bound
    from tests.test_decode_attention import _gap as attention_gap
    from tests.test_layer_kernels import ROTARY_SHAPES, SILU_SHAPES, _rotary_gaps, _silu_gap

    assert torch.cuda.current_device() == 0
    assert _norm_gap(*NORMS[0], "cuda:1") <= 1.0
    logits, scores = _inputs(*CASES[0], "cuda:1")
    assert _gap(fused_mix(logits, scores), _reference(logits, scores)) <= 1e-4
    assert max(_rotary_gaps(*ROTARY_SHAPES[1], "cuda:1")) <= 1.0
    assert _silu_gap(*SILU_SHAPES[0], "cuda:1") <= 1.0
    assert attention_gap(ATTENTION[1], "cuda:1") <= _bound(ATTENTION[1][0])
