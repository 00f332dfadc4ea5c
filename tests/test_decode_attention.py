"""mol.network.decode_attention: one-token attention over a static cache, reading only the key blocks the mask
lets through, equals the softmax over all keys computed in float32 (and a decode on it gives the plain path's
tokens): on CUDA and, where Triton is installed, in Triton's interpreter on the CPU."""

import pytest
import torch

import mol
from mol.fast import FastDecoder
from mol.network import attention, decode_attention
from tests.test_kernels import in_the_interpreter, interpreter
from tests.tiny_models import identity_recipe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (dtype, B, KV heads, queries per head, N keys, D, mask): grouped queries and one per head, a head size no power
# of two, a cache over several chunks, boolean masks and one broadcast over the batch
CASES = [
    ("float32", 2, 2, 4, 100, 16, "additive"),
    ("bfloat16", 1, 4, 8, 384, 64, "additive"),
    ("float16", 3, 1, 1, 70, 80, "bool"),
    ("bfloat16", 2, 2, 3, 1300, 32, "additive"),
    ("float32", 2, 3, 2, 1100, 16, "bool"),
    ("bfloat16", 2, 2, 2, 200, 64, "broadcast"),
]


def _case(dtype, b, kv, groups, n, d, kind, device):
    g = torch.Generator().manual_seed(n)
    dt = getattr(torch, dtype)
    rows = torch.randn(b, kv, groups, d, generator=g).to(dt)
    key, value = (torch.randn(b, kv, n, d, generator=g).to(dt) for _ in range(2))
    allowed = torch.rand(b, n, generator=g) < 0.5
    allowed[:, n // 2 :] = False  # the later half not written yet: its blocks are skipped
    allowed[:, 3] = True
    if n > 600:
        allowed[:, 100:550] = False  # a whole chunk ruled out
    if kind == "broadcast":
        allowed = allowed[:1]
    mask = allowed[:, None, None, :]
    if kind != "bool":
        mask = torch.zeros(mask.shape, dtype=dt).masked_fill(~mask, torch.finfo(dt).min)
        mask[..., 3] = -1.5  # an added bias that does not rule out
    return [t.to(device) for t in (rows, key, value, mask)]


def _reference(rows, key, value, mask, scale):
    """The softmax over every key in float32."""
    bias = (
        mask.float()
        if mask.dtype != torch.bool
        else torch.zeros(mask.shape).masked_fill(~mask.cpu(), -torch.inf)
    )
    scores = rows.float() @ key.float().transpose(-1, -2) * scale + bias.to(rows.device)[:, :, :1, :]
    return (scores.softmax(-1) @ value.float()).to(rows.dtype)


def _gap(case, device):
    rows, key, value, mask = _case(*case, device)
    scale = case[5] ** -0.5
    got = decode_attention.decode_attention(rows, key, value, mask, scale)
    want = _reference(rows, key, value, mask, scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    return (got.float() - want.float()).abs().max().item()


def _bound(dtype):
    return {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]


def _ruled_out_row(device):
    """A batch row whose every key is ruled out gets zeros, the others their softmax."""
    rows, key, value, mask = _case("float32", 2, 2, 2, 130, 16, "bool", device)
    mask[1] = False
    got = decode_attention.decode_attention(rows, key, value, mask, 0.25)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert (got[0] - _reference(rows, key, value, mask, 0.25)[0]).abs().max().item() <= 1e-5


@cuda
@torch.no_grad()
@pytest.mark.parametrize("case", CASES)
def test_decode_attention_equals_the_softmax_over_all_keys_on_cuda(case):
    assert _gap(case, "cuda") <= _bound(case[0])


@cuda
def test_a_row_with_no_key_gets_zeros_on_cuda():
    _ruled_out_row("cuda")


@interpreter
def test_decode_attention_equals_the_softmax_over_all_keys_in_the_triton_interpreter():
    script = """
        from tests.test_decode_attention import CASES, _bound, _gap, _ruled_out_row
        for case in CASES:
            if case[0] != "bfloat16":  # (the interpreter's products of bfloat16 matrices are wrong, Triton 3.9)
                gap = _gap(case, "cpu")
                assert gap <= _bound(case[0]) * 2, (case, gap)  # (and it rounds by truncation)
        _ruled_out_row("cpu")
        print("ok", len(CASES))
        """
    assert in_the_interpreter(script) == ["ok", str(len(CASES))]


def test_only_one_token_steps_under_a_mask_take_the_kernel():
    q = torch.zeros(1, 4, 1, 16)
    k = torch.zeros(1, 2, 10, 16)
    mask = torch.zeros(1, 1, 1, 10)
    assert decode_attention.supports(q, k, k, mask)
    assert not decode_attention.supports(q, k, k, None)  # plainly causal: SDPA's own
    assert not decode_attention.supports(torch.zeros(1, 4, 2, 16), k, k, torch.zeros(1, 1, 2, 10))  # a prompt
    wide = torch.zeros(1, 2, 10, 512)
    assert not decode_attention.supports(torch.zeros(1, 4, 1, 512), wide, wide, mask)  # heads over 256
    assert not decode_attention.supports(q, k, k, torch.zeros(1, 1, 1, 9))  # fewer mask columns than keys
    assert not decode_attention.supports(torch.zeros(1, 3, 1, 16), k, k, mask)  # 3 heads over 2 KV heads
    assert not decode_attention.supports(q, k, k.bfloat16(), mask)  # values of another dtype
    assert not decode_attention.supports(q, k, k, torch.zeros(3, 1, 1, 10))  # a mask of another batch
    strided = torch.zeros(1, 2, 10, 32)[..., ::2]
    assert not decode_attention.supports(q, strided, strided, mask)  # rows not contiguous


@cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_cuda_graph_decode_on_the_kernel_equals_the_plain_path(tiny, family, monkeypatch):
    recipe = identity_recipe(tiny(family))
    model = mol.build(recipe, device="cuda", dtype=torch.float32)
    ids = torch.randint(1, 380, (2, 9), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with monkeypatch.context() as torch_only:  # the plain path on torch's SDPA
        torch_only.setattr(attention, "runs_on", lambda device: False)
        want = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], fast=False)
    calls = []
    real = decode_attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or real(*a))
    got = FastDecoder(model, 2, 640, cuda_graph=True).generate(ids, mask, max_new_tokens=20)
    assert calls and got.tolist() == want.tolist()
