"""The one dtype table: each safetensors name reads as a torch dtype of the size it declares, and every way of
naming a dtype (safetensors, torch, a user's short name) resolves to the same entry."""

import pytest
import torch
from safetensors.torch import save_file

from mol import dtypes
from mol.sources import read_safetensors_header, read_tensor


@pytest.mark.parametrize("name", list(dtypes.SAFETENSORS))
def test_each_safetensors_dtype_has_its_torch_dtype_and_size(name):
    dt = dtypes.to_torch(name)
    assert torch.empty((), dtype=dt).element_size() == dtypes.itemsize(name)
    assert dtypes.safetensors_name(dt) == name
    assert dtypes.safetensors_name(str(dt)) == name  # "torch.float32", as pickles name them
    assert dtypes.is_float(name) == dt.is_floating_point


def test_weight_names():
    assert dtypes.to_torch(dtypes.WEIGHT_NAMES["bf16"]) is torch.bfloat16
    assert dtypes.itemsize("float16") == 2 and dtypes.itemsize("fp32") == 4
    assert dtypes.safetensors_name("complex64") is None


def test_read_tensor_reads_what_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2], dtype=torch.int16),
        "c": torch.randn(3, 2).to(torch.bfloat16),
        "d": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
        "e": torch.tensor([True, False]),
        "f": torch.tensor([7, 9], dtype=torch.uint32),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    infos = read_safetensors_header(path)
    with open(path, "rb", buffering=0) as fh:
        for name, want in tensors.items():
            got = read_tensor(fh.fileno(), infos[name])
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (
                name
            )
