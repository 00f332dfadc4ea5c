"""Placement: spread a recipe's slots over several GPUs, or offload some to host memory, with accelerate.

    model = mol.build(recipe, device_map="auto")                          # balanced over the visible GPUs
    model = mol.build(recipe, device_map="sequential", max_memory={0: "3GiB", 1: "3GiB", "cpu": "64GiB"})
    model = mol.build(recipe, device_map={"slots.0-10": 0, "slots.11-21": 1})
    model = mol.build(recipe, device_map={"slots.12-21": "cpu"})           # offloaded, run on the main GPU

The map is made from the plan (tensor sizes are known before a byte of weights is read), so each slot's
tensors are read straight onto their device. Embeddings, final norm and head stay on the main device (the
first GPU, or `device`). A slot runs on its own device: the stream moves there on entry (FusedSlot.forward)
and the step's masks and positions move once per device (StepContext.on); each expert's KV cache is made
where its keys are. A slot mapped to "cpu" while a GPU is the main device is offloaded: its blocks' weights
stay in host memory and accelerate's hooks (`cpu_offload`) copy them to the main GPU for each forward; slow,
for recipes that do not fit. Disk offload is not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from mol import dtypes
from mol.errors import RecipeError, ResourceError


@dataclass
class Placement:
    main: torch.device
    slots: list[torch.device]  # where each slot's weights are read to
    offload: set[int] = field(default_factory=set)  # slots kept in host memory, run on `main`
    sizes: list[int] = field(default_factory=list)  # bytes of each slot's weights

    def load_device(self, index: int) -> torch.device:
        return self.slots[index]

    def device_map(self) -> dict[str, str]:
        out = {"main": str(self.main)}
        for i, d in enumerate(self.slots):
            out[f"slots.{i}"] = "cpu (offloaded)" if i in self.offload else str(d)
        return out

    def apply(self, model) -> None:
        """Mark each slot's device, and hook the offloaded ones (after the model is built)."""
        from accelerate import cpu_offload

        for slot in model.slots:
            if slot.index in self.offload:
                for e in slot.experts:
                    cpu_offload(e.layer, execution_device=self.main, offload_buffers=True)
                    for part in (e.adapter, e.positions):
                        if part is not None:
                            part.to(self.main)
                if slot.router is not None:
                    slot.router.to(self.main)
            elif self.slots[slot.index] != self.main:
                slot.device = self.slots[slot.index]
        model.placement = self


def slot_sizes(plan, dtype: torch.dtype) -> list[int]:
    """Bytes of each slot's weights in `dtype` (repeated layers counted per slot), from the plan alone."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = []
    for sp in plan.slots:
        total = 0
        for e in sp.experts:
            prefix = f"{plan.sources[e.alias].family.layers}.{e.layer}."
            for t in plan.reads[e.alias]:
                if t.name.startswith(prefix):
                    total += t.nbytes // dtypes.itemsize(t.dtype) * size
            if e.adapter is not None:
                total += 2 * plan.width * e.width * size
        sizes.append(total)
    return sizes


def _main_bytes(plan, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    layers = tuple(f"{s.family.layers}." for s in plan.sources.values())
    return sum(
        t.nbytes // dtypes.itemsize(t.dtype) * size
        for t in plan.reads[plan.base.alias]
        if not t.name.startswith(layers)
    )


def resolve_device(value: str | int | torch.device | None = None) -> torch.device:
    """The device `value` names (None: CUDA if present, else CPU), or a ResourceError saying why it cannot run a
    model here; checked once, before anything is read, rather than failing deep inside torch."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(value, int):
        value = f"cuda:{value}"
    try:
        d = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ResourceError(f"'{value}' is not a device; use cpu, cuda or cuda:N.") from None
    if d.type == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ResourceError(f"Device '{value}': no CUDA GPU is visible here; use cpu.")
        if (d.index or 0) >= gpus:
            raise ResourceError(
                f"Device '{value}': only {gpus} CUDA GPU(s) are visible (cuda:0 to cuda:{gpus - 1})."
            )
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ResourceError(f"Device '{value}': MPS is not available here; use cpu.")
    elif d.type != "cpu":
        raise ResourceError(f"Device '{value}' cannot run a model; use cpu, cuda or cuda:N.")
    return d


def _device(value) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    d = torch.device(value)
    return torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d


def plan_placement(
    plan, device_map, max_memory: dict | None, dtype: torch.dtype, device: torch.device | None = None
) -> Placement:
    """Decide each slot's device from the plan: "auto"/"balanced" (even over the GPUs), "sequential" (fill
    each GPU up to its `max_memory` in turn), or a dict {"slots.i" or "slots.i-j": device}; what does not fit
    the GPUs goes to "cpu" (offloaded) if `max_memory` allows it."""
    gpus = torch.cuda.device_count()
    n = len(plan.slots)
    sizes = slot_sizes(plan, dtype)
    if isinstance(device_map, dict):
        main = _device(device_map.get("main", device if device is not None else (0 if gpus else "cpu")))
        slots = [main] * n
        for key, value in device_map.items():
            if key == "main":
                continue
            m = re.fullmatch(r"slots\.(\d+)(?:-(\d+))?", str(key))
            if not m:
                raise RecipeError(f"device_map key '{key}' is not 'main', 'slots.<i>' or 'slots.<i>-<j>'.")
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            if last >= n:
                raise RecipeError(f"device_map key '{key}': the recipe has {n} slots (0..{n - 1}).")
            for i in range(first, last + 1):
                slots[i] = _device(value)
    elif device_map in ("auto", "balanced", "sequential"):
        main, slots = _fill(plan, sizes, device_map, max_memory, dtype, gpus, device)
    else:
        raise RecipeError(f"device_map '{device_map}' is not 'auto', 'balanced', 'sequential' or a dict.")
    for d in {*slots, main}:
        if d.type == "cuda" and (d.index or 0) >= gpus:
            raise ResourceError(f"device_map names {d}, but {gpus} CUDA device(s) are visible.")
    offload = {i for i, d in enumerate(slots) if d.type == "cpu" and main.type != "cpu"}
    return Placement(main=main, slots=slots, offload=offload, sizes=sizes)


def _fill(plan, sizes, how, max_memory, dtype, gpus, device) -> tuple[torch.device, list[torch.device]]:
    if gpus == 0:
        main = device if device is not None else torch.device("cpu")
        return main, [main] * len(sizes)
    from accelerate.utils import get_max_memory

    budgets = get_max_memory(max_memory)  # {0: bytes, 1: bytes, ..., "cpu": bytes}, strings parsed
    order = [k for k in budgets if isinstance(k, int)]
    if not order:
        raise ResourceError("max_memory gives no GPU any memory.")
    main = torch.device("cuda", order[0])
    room = {k: int(budgets[k] * 0.9) for k in order}  # the rest: activations and the KV cache
    used = {k: 0 for k in order}
    used[order[0]] = _main_bytes(plan, dtype)
    share = (sum(sizes) + used[order[0]]) / len(order) * 1.02 if how in ("auto", "balanced") else float("inf")
    host = int(budgets.get("cpu", 0))
    slots, k = [], 0
    for i, size in enumerate(sizes):
        while k < len(order) and used[order[k]] + size > min(room[order[k]], share):
            k += 1
        j = (
            order[k]
            if k < len(order)
            else next((j for j in reversed(order) if used[j] + size <= room[j]), None)
        )
        if j is not None:
            used[j] += size
            slots.append(torch.device("cuda", j))
        elif size <= host:
            host -= size
            slots.append(torch.device("cpu"))
        else:
            raise ResourceError(
                f"slot {i} ({size / 2**20:.0f} MiB) fits neither the GPUs' nor the host's "
                "max_memory; raise max_memory or use a smaller recipe."
            )
    return main, slots
