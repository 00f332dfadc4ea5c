"""Build a FusedModel from a plan, reading only the planned tensors (exact byte ranges of the safetensors
files), constructing blocks on the meta device and filling them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from mol import dtypes, layout
from mol.access import LOCAL, AccessPolicy
from mol.errors import CheckpointError, ResourceError
from mol.fused import FusedModel
from mol.network.modeling_mol import fill_embed_scale
from mol.placement import resolve_device
from mol.planning import Plan, plan
from mol.recipe import Recipe, to_recipe
from mol.sources import ModelSource, checked_file, one_line, read_tensor


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TensorReader:
    """Reads named tensors of one source from its safetensors files, and counts the bytes it read.

    Each tensor is one read of exactly its byte range into a fresh buffer, with the kernel's read-ahead off: a
    memory map would fault pages in with read-ahead around them (reading parts of unselected layers) and would
    keep every touched page resident, so host memory would grow with all that was read even when the weights
    go on to a GPU."""

    def __init__(self, source: ModelSource, stack: ExitStack):
        self.source, self.stack = source, stack
        self.handles: dict[Path, object] = {}  # file -> raw file
        self.bytes_read = 0
        self.advised: set[str] = set()  # tensors whose range the kernel was already asked for

    def _open(self, path: Path):
        """The raw file, checked again (regular, and allowed by the source's policy) as it is opened.
        Byte ranges come from the header entries the plan read and checked, not from a second parse."""
        import os

        if path not in self.handles:
            try:
                if checked_file(path, self.source.folder, self.source.policy) is None:
                    raise FileNotFoundError(f"'{path}' is gone")
                fh = self.stack.enter_context(open(path, "rb", buffering=0))
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            except OSError as exc:
                raise CheckpointError(f"'{path}' cannot be opened: {one_line(exc)}.") from None
            self.handles[path] = fh
        return self.handles[path]

    def prefetch(self, infos, limit: int = 2 << 30) -> None:
        """Ask the kernel to start reading these tensors' byte ranges now, in large requests and in the
        background (up to `limit` bytes): with read-ahead off, a cold read would otherwise go page by page."""
        for info in infos:
            if limit <= 0:
                return
            if info.file.suffix == ".safetensors":
                limit -= info.nbytes
                self._will_need(info)

    def _will_need(self, info) -> None:
        import os

        if not hasattr(os, "posix_fadvise") or info.name in self.advised:
            return
        self.advised.add(info.name)
        try:
            os.posix_fadvise(self._open(info.file).fileno(), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # only a hint: a file system without it still reads
            pass

    def get(self, name: str) -> torch.Tensor:
        info = self.source.tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"{self.source.alias}: tensor '{name}' is missing from '{self.source.folder}'."
            )
        if info.file.suffix == ".bin":  # opt-in pickles (policy.allow_bin), loaded with weights_only
            from mol.sources import load_pickle

            self.bytes_read += info.nbytes
            return load_pickle(info.file)[name]
        fh = self._open(info.file)
        self._will_need(info)  # beyond the prefetch: one large request, not page-sized reads
        tensor = read_tensor(fh.fileno(), info)
        self.bytes_read += info.nbytes
        return tensor


def _fill(
    module: nn.Module, prefix: str, reader: TensorReader, device, dtype, shared: dict | None = None
) -> nn.Module:
    """Load `prefix.<name>` for every parameter/buffer of a meta-device module, casting floats to `dtype`."""
    state = {}
    for name, meta in module.state_dict().items():
        full = f"{prefix}.{name}"
        if shared is not None and full in shared:
            t = shared[full]
        else:
            t = reader.get(full)
            if t.is_floating_point():
                t = t.to(dtype)
            t = t.to(device)
            if shared is not None:
                shared[full] = t
        if tuple(t.shape) != tuple(meta.shape):
            raise CheckpointError(
                f"{reader.source.alias}: tensor '{full}' has shape {list(t.shape)} but the config implies "
                f"{list(meta.shape)}; config.json does not match the weights in '{reader.source.folder}'."
            )
        state[name] = t
    module.load_state_dict(state, assign=True, strict=True)
    return module


def build(
    recipe: Recipe | Plan | Path | str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    weights: str | Path | None = None,
    load_tokenizer: bool = True,
    policy: AccessPolicy = LOCAL,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    fuse_kernels: bool = True,
) -> FusedModel:
    """Turn a recipe (a Recipe, a Plan, a Path to a recipe file, or YAML text: a str is never a path) into a
    FusedModel on one device, or spread over several GPUs and CPU offload with `device_map` ("auto", "balanced",
    "sequential" or {"slots.3": 1, ...}; `max_memory` as accelerate takes it): see mol.placement. A recipe is
    planned under `policy` (see mol.plan); a Plan keeps the policy it was made under. On a GPU the source layers'
    projections of one input run as one matrix product and their RMSNorms as one kernel (`FusedModel.fuse_kernels`);
    `fuse_kernels=False` keeps them as their families wrote them."""
    the_plan = recipe if isinstance(recipe, Plan) else plan(to_recipe(recipe), policy=policy)
    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = dtypes.to_torch(dtypes.WEIGHT_NAMES[dtype])
    placement = None
    if device_map is not None and the_plan.lanes:
        raise ResourceError("A recipe with lanes runs on one device for now; build it without device_map.")
    if device_map is not None:
        from mol.placement import plan_placement

        placement = plan_placement(the_plan, device_map, max_memory, dtype or default_dtype(device), device)
        device = placement.main
    dtype = dtype or default_dtype(device)  # of the device it runs on (a map may keep it all on the CPU)
    try:
        model = _build(the_plan, device, dtype, placement)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ResourceError(
            f"Out of memory on {device} while building '{the_plan.recipe.name}' "
            f"(estimate {the_plan.memory_estimate(str(dtype).split('.')[-1])['total'] / 2**30:.2f} GiB). "
            "Use fewer or smaller blocks, bf16, or another device."
        ) from None
    if weights is not None:
        from mol.weights import load_trainable

        load_trainable(model, weights)
    if load_tokenizer:
        model.tokenizer = the_plan.base.load_tokenizer()
    model.kernel_fusion = fuse_kernels
    model.fuse_kernels()  # after placement: offloaded layers keep their own kernels
    return model


def _build(the_plan: Plan, device: torch.device, dtype: torch.dtype, placement=None) -> FusedModel:
    """The network built on the meta device from the plan's layout (mol.layout), its adapters, routers and
    rotary modules made on `device`, then every part read from the files filled in place (mol.layout.file_parts:
    the same list the export writes)."""
    with torch.device("meta"):
        model = FusedModel(the_plan, init_device=device)
    if model.lanes is not None:
        model.stitches.to(dtype=dtype)  # the gate stays in float32, as routers do
    for slot in model.all_slots:
        where = device if placement is None else placement.load_device(slot.index)
        for e in slot.experts:
            if e.adapter is not None:
                e.adapter.to(device=where, dtype=dtype)
        if slot.router is not None:
            slot.router.to(device=where)
    with ExitStack() as stack:
        readers = {a: TensorReader(s, stack) for a, s in the_plan.sources.items()}
        for alias, infos in the_plan.reads.items():  # disk reads overlap building the modules
            readers[alias].prefetch(infos)
        shared: dict[
            tuple, dict
        ] = {}  # (alias, device) -> tensors already read: a repeated layer shares them
        for path, alias, prefix in layout.file_parts(the_plan):
            where = device
            if placement is not None and path.startswith("slots."):
                where = placement.load_device(int(path.split(".")[1]))
            _fill(
                model.get_submodule(path),
                prefix,
                readers[alias],
                where,
                dtype,
                shared.setdefault((alias, where), {}),
            )
        model.bytes_read = sum(r.bytes_read for r in readers.values())
    for stream in model.lanes.values() if model.lanes is not None else [model]:
        if stream.config.tie_word_embeddings:
            stream.head.weight = stream.embed.weight  # the embedding just read
    for module in model.modules():
        fill_embed_scale(module)
    model.eval()
    if placement is not None:
        placement.apply(model)
    return model
