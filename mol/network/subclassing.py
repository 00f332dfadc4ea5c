"""Swapping a source module for one of a subclass of its own class that runs a kernel of mol.network.kernels
(mol.network.rotary, mol.network.gated_mlp): the swapped-in module shares the original's parameters, buffers,
submodules and hooks (its `__dict__`), so `state_dict`, loading, export, `isinstance` and the hooks put on it
(a routed slot's TokenSubset) see what they saw; its forward takes the kernel where it can and its class's own
forward otherwise. A module is swapped only where, on a probe, the kernel's forward gives what its own gives."""

from __future__ import annotations

import weakref

import torch
from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}  # (mixin, module class) -> their subclass
_UNMATCHED: dict[type, weakref.WeakSet] = {}  # mixin -> the modules its probe found otherwise


def as_subclass(module: nn.Module, mixin: type) -> nn.Module:
    """`module` as an instance of a subclass of `mixin` and its class, sharing its state."""
    swapped = _blank(mixin, type(module))
    swapped.__dict__.update(module.__dict__)
    return swapped


def _blank(mixin: type, base: type) -> nn.Module:
    """An instance of the subclass of `mixin` and `base`, with no state yet (made once, not importable by name:
    pickled and copied through this function)."""
    if (mixin, base) not in _CLASSES:

        def reduce(self, protocol):
            return _blank, (mixin, base), self.__dict__

        name = f"{mixin.__name__}{base.__name__}"
        _CLASSES[mixin, base] = type(
            name, (mixin, base), {"__module__": mixin.__module__, "__reduce_ex__": reduce}
        )
    return object.__new__(_CLASSES[mixin, base])


def same_to_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two outputs of a probe agree: in float32 to rounding, in half precision to about one rounding
    of the result."""
    bound = (1e-5 if want.dtype == torch.float32 else 2**-6) * max(1.0, want.float().abs().max().item())
    return got.shape == want.shape and (got.float() - want.float()).abs().max().item() <= bound


def swapped_where_same(module: nn.Module, mixin: type, same) -> nn.Module:
    """`module` as its `mixin` subclass where `same(swapped)` finds, on a probe, the kernel's forward giving the
    module's own outputs; otherwise `module`, not probed again (each probe waits on the device). A probe that
    fails to run (a forward that takes other arguments, shapes the kernel's forward does not expect) counts as a
    mismatch: the module keeps its own forward."""
    unmatched = _UNMATCHED.setdefault(mixin, weakref.WeakSet())
    if isinstance(module, mixin) or module in unmatched:
        return module
    swapped = as_subclass(module, mixin)
    try:
        if same(swapped):
            return swapped
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        pass
    unmatched.add(module)
    return module
