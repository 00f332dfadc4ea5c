"""A dispatch mode that records the operators which make the host wait for a device value: a scalar read, or an
output whose size depends on the values (a selection by mask). On a GPU each is a stall of the whole queue."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        by_mask = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func in _READS or by_mask:
            self.ops.append(str(func))
        return func(*args, **kwargs)
