"""Element types, declared once: every safetensors dtype with its size in bytes and the torch dtype it reads as,
and the names a user or a config writes ("bfloat16", "bf16", "torch.float16"). Importing it needs no torch (the
plan reads headers before torch is loaded); torch dtypes are looked up when asked for.

Left out: the sub-byte safetensors types (F4, F6_E2M3, F6_E3M2), whose shapes count elements smaller than a byte;
torch has no matching element type (float4_e2m1fn_x2 packs two to a byte)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors name -> (bytes per element, torch dtype name)
SAFETENSORS: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOATS = frozenset(n for n in SAFETENSORS if n.startswith(("F", "BF")))
_BY_TORCH_NAME = {torch_name: st for st, (_, torch_name) in SAFETENSORS.items()}
# what a user may write for the dtype of a model's weights
WEIGHT_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
}


def safetensors_name(dtype: str | torch.dtype) -> str | None:
    """The safetensors name of a torch dtype or of any name for one ("F32", "float32", "torch.float32",
    "fp32"); None when safetensors has none."""
    name = str(dtype)
    if name in SAFETENSORS:
        return name
    name = name.removeprefix("torch.")
    return WEIGHT_NAMES.get(name) or _BY_TORCH_NAME.get(name)


def itemsize(dtype: str | torch.dtype, default: int = 4) -> int:
    """Bytes per element of a dtype named in any of the ways `safetensors_name` reads."""
    st = safetensors_name(dtype)
    return SAFETENSORS[st][0] if st is not None else default


def is_float(dtype: str | torch.dtype) -> bool:
    return safetensors_name(dtype) in FLOATS


def to_torch(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a safetensors name (or of any name `safetensors_name` reads); KeyError when torch or
    safetensors has none."""
    import torch

    st = safetensors_name(dtype)
    found = getattr(torch, SAFETENSORS[st][1], None) if st is not None else None
    if not isinstance(found, torch.dtype):
        raise KeyError(str(dtype))
    return found
