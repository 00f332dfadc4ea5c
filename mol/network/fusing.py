"""Fewer, larger kernels for the frozen source layers, with the layers' own code and tensors.

At batch 1 a decode step is bound by its kernels' count and by matrix products too small to fill the GPU. Module
swaps take much of that away; each new module holds the very parameters of the one it replaces, under the same
names, so `state_dict`, loading, saving and export see what they saw:

- **Projections of one input** (a Llama layer's q, k and v; its MLP's gate and up), named by the family
  (`Family.fused_projections`), become `FusedLinear`s of one `ProjectionGroup`: one matrix product over their
  weights concatenated, each weight a view of its rows (no second copy). Each member takes its slice of the
  product when called with the input the product was made from, and runs its own `F.linear` otherwise (another
  input, weights that train, weights replaced since and not fusable again).
- **Attention layers and gated MLPs of the Llama form** run their rotary embedding and cache write
  (mol.network.rotary), and their activation and product (mol.network.gated_mlp), as one kernel each, where a
  probe finds the kernel's forward equal to theirs.
- **RMSNorm modules** become `FusedRMSNorm`s, one `F.rms_norm` in the form that matches the module's forward,
  checked on a probe; a module no form matches is left as it is. With no gradient wanted on CUDA the whole
  form is one Triton kernel (mol.network.kernels), where the torch form is four (a cast, the norm, a cast back,
  the scale). Under `torch.compile` they compute the form step by step, which inductor fuses with the operations
  around it (the one kernel would stand between them).

`fuse_layer` swaps them in a layer, on the device types in `devices`: CUDA by default, since on the CPU, where a
step is bound by its products' arithmetic rather than by launches, the slices' strided outputs cost more than
the fewer calls save (7% slower on 2 threads, measured)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .gated_mlp import fused_mlp
from .rotary import fused_attention

# After this many times its members' weights were found replaced (moved, converted, offloaded per call), a group
# stops fusing them again and its members run on their own.
MAX_REFUSES = 4
DEVICES = ("cuda",)  # the device types fused by default


class ProjectionGroup:
    """Linear layers that read one input, run as one matrix product (shared by its FusedLinear members)."""

    def __init__(self, linears: list[nn.Linear], devices: tuple[str, ...] = DEVICES):
        self.devices = devices
        self.members = [FusedLinear(m, self, i) for i, m in enumerate(linears)]
        self.sizes = [m.out_features for m in linears]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.pointers: tuple[int, ...] = ()
        self.refuses = 0
        self.input: torch.Tensor | None = None  # the input of the product whose slices are not all taken yet
        self.parts: tuple[torch.Tensor, ...] = ()
        self.taken: set[int] = set()

    def fuse(self) -> bool:
        """Concatenate the members' weights and make each a view of its rows. False where they cannot be."""
        self.release()
        weights = [m.weight for m in self.members]
        if (
            any(w.device.type not in self.devices or w.requires_grad for w in weights)
            or len({(w.device, w.dtype) for w in weights}) != 1
        ):
            return False
        with torch.no_grad():
            self.weight = torch.cat([w.detach() for w in weights])
            for m, rows in zip(self.members, self.weight.split(self.sizes), strict=True):
                m.weight.data = rows
            if self.members[0].bias is not None:
                self.bias = torch.cat([m.bias.detach() for m in self.members])
                for m, rows in zip(self.members, self.bias.split(self.sizes), strict=True):
                    m.bias.data = rows
        self.pointers = self._pointers()
        return True

    def _pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for m in self.members for t in (m.weight, m.bias) if t is not None)

    def ready(self, x: torch.Tensor) -> bool:
        """Whether the one product stands for the members now (fused again where their weights were replaced)."""
        if self.refuses > MAX_REFUSES:
            return False
        if any(m.weight.requires_grad for m in self.members):
            return False  # training them: gradients must reach each member's own weight
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled() and x.requires_grad:
                # A compiled training step measured slower with it (MFU 0.43 -> 0.39): the backward of one
                # product concatenates its slices' gradients.
                return False
            # Traced: the eager calls before it checked the weights. A compiled step does not see weights
            # replaced after its compilation (an eager call, or compiling again, does).
            return self.weight is not None
        if self.weight is not None and self._pointers() == self.pointers:
            return True
        if self.weight is not None:  # replaced behind the group's back (not moved: that releases it)
            self.refuses += 1
        return self.refuses <= MAX_REFUSES and self.fuse()

    def release(self) -> None:
        """Drop the concatenated weight (its members are being moved or converted, each to a tensor of its own):
        the old device's memory goes with them, and the next call fuses the new tensors."""
        self.weight = self.bias = None
        self.input, self.parts = None, ()

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member `i`'s output for `x`: its slice of the one product of `x` (made now, where not yet made or its
        slice was taken already), or its own product where the group cannot stand for it."""
        if self.input is not x or i in self.taken:
            if not self.ready(x):
                m = self.members[i]
                return F.linear(x, m.weight, m.bias)
            out = F.linear(x, self.weight, self.bias)
            self.input, self.parts, self.taken = x, out.split(self.sizes, dim=-1), set()
        self.taken.add(i)
        part = self.parts[i]
        if len(self.taken) == len(self.members):  # every slice given: hold no activation past the layer
            self.input, self.parts = None, ()
        return part


class FusedLinear(nn.Linear):
    """A Linear layer, with the parameters of the one it replaces, whose output is its slice of its group's
    product."""

    def __init__(self, linear: nn.Linear, group: ProjectionGroup, index: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.group, self.index = group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): each weight becomes a tensor of its own
        self.group.release()
        return super()._apply(fn, recurse)


def fuse_projections(layer: nn.Module, paths, devices: tuple[str, ...] = DEVICES) -> ProjectionGroup | None:
    """Swap the Linear layers at `paths` (relative to `layer`) for the FusedLinears of one group, where they can
    be: plain Linears of one input width, all with biases or none, on one device of a type in `devices`, not
    frozen out of it. The group, or None."""
    try:
        linears = [layer.get_submodule(p) for p in paths]
    except AttributeError:
        return None  # this release or variant names them otherwise: nothing to fuse
    if (
        len(linears) < 2
        or any(type(m) is not nn.Linear or hasattr(m, "_hf_hook") for m in linears)  # (offloaded: accelerate)
        or len({m.in_features for m in linears}) != 1
        or len({m.bias is None for m in linears}) != 1
        or any(m.weight.device.type not in devices for m in linears)
    ):
        return None  # subclasses (quantised, LoRA-wrapped, fused already) keep their own forward
    group = ProjectionGroup(linears, devices)
    if not group.fuse():
        return None
    for path, member in zip(paths, group.members, strict=True):
        layer.set_submodule(path, member)
    return group


# ---- RMSNorm --------------------------------------------------------------------------------------------------
def _rms_kernel(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps)


def _rms_steps(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# The forms RMSNorm modules take: the weight applied around a normalisation in float32.
RMS_FORMS = {
    "scale_after_cast": lambda x, w, eps, rms: w * rms(x, eps).to(x.dtype),  # Llama, Mistral, Qwen, Granite
    "scale_before_cast": lambda x, w, eps, rms: (w * rms(x, eps)).to(x.dtype),  # OLMo 2
    "one_plus_weight": lambda x, w, eps, rms: (rms(x, eps) * (1.0 + w.float())).to(x.dtype),  # Gemma
}


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def rms_form(module: nn.Module) -> str | None:
    """The form of RMS_FORMS that computes `module`'s forward (the closest, on a probe of its own weight), or
    None where none does."""
    w = getattr(module, "weight", None)
    eps = _eps(module)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.is_meta or eps is None:
        return None
    probe = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype) * 3
    with torch.no_grad():
        want = module(probe).float()
        gaps = {
            name: (form(probe, w, eps, _rms_kernel).float() - want).abs().max().item()
            for name, form in RMS_FORMS.items()
        }
    # Float32 agrees to rounding; half precision to about one rounding of the result.
    bound = (1e-5 if w.dtype == torch.float32 else 2**-6) * max(1.0, want.abs().max().item())
    best = min(gaps, key=gaps.get)
    return best if gaps[best] <= bound else None


class FusedRMSNorm(nn.Module):
    """An RMSNorm, with the weight of the one it replaces, in one of RMS_FORMS."""

    def __init__(self, norm: nn.Module, form: str, eps: float):
        super().__init__()
        self.weight, self.form = norm.weight, form
        self.eps = self.variance_epsilon = eps  # under both names families give it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One kernel where it runs, where torch's form takes four (a cast, the norm, a cast back, the scale)
        if kernels.runs_on(x.device) and x.shape[-1] <= kernels.MAX_NORM_WIDTH:
            return kernels.rms_norm(x, self.weight, self.eps, self.form)
        rms = _rms_steps if torch.compiler.is_compiling() else _rms_kernel
        return RMS_FORMS[self.form](x, self.weight, self.eps, rms)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, form={self.form}"


# Norms no form matched: not probed again at the next `fuse_layer` (each probe waits on the device).
_UNMATCHED: weakref.WeakSet = weakref.WeakSet()


def fused_norm(module: nn.Module, devices: tuple[str, ...] = DEVICES) -> nn.Module:
    """A FusedRMSNorm for an RMSNorm `module` on a device of a type in `devices` where one of RMS_FORMS matches
    its forward; otherwise `module` itself."""
    if (
        isinstance(module, FusedRMSNorm)
        or not type(module).__name__.endswith("RMSNorm")
        or hasattr(module, "_hf_hook")
        or module in _UNMATCHED
    ):
        return module
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type not in devices:
        return module
    form = rms_form(module)
    if form is None:
        _UNMATCHED.add(module)
        return module
    return FusedRMSNorm(module, form, _eps(module))


# ---- a layer --------------------------------------------------------------------------------------------------
def fuse_layer(layer: nn.Module, groups, devices: tuple[str, ...] = DEVICES) -> None:
    """Swap in `layer` the FusedLinears of each group of projections (paths relative to the layer) that can be
    fused, FusedRMSNorms for its norms, and the kernels' subclasses of its Llama-form attention and MLP (where
    Triton's kernels can run), where their weights sit on a device of a type in `devices` (a layer fused already
    is left as it is)."""
    for paths in groups:
        fuse_projections(layer, paths, devices)
    for path, module in list(layer.named_modules()):
        if path and (norm := fused_norm(module, devices)) is not module:
            layer.set_submodule(path, norm)
    for path, module in list(layer.named_modules()):  # after the projections and norms: they share them
        weight = next((p for p in module.parameters() if p.dim() == 2), None)
        if not path or weight is None or weight.device.type not in devices:
            continue
        for swap in (fused_attention, fused_mlp):
            if (swapped := swap(module)) is not module:
                layer.set_submodule(path, swapped)
                break
