"""Build a FusedModel from a plan, reading only the planned tensors (exact byte ranges of the safetensors
files), constructing blocks on the meta device and filling them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from mol import dtypes, layout
from mol.access import LOCAL, AccessPolicy
from mol.adapters import make_adapter
from mol.errors import CheckpointError, ResourceError
from mol.families import cache_keyword
from mol.fused import ExpertBlock, FusedModel, FusedSlot
from mol.placement import resolve_device
from mol.planning import Plan, plan
from mol.recipe import Recipe, to_recipe
from mol.routers import make_router
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


def _reindex(layer: nn.Module, index: int) -> None:
    """Give every attention module of an extracted layer its slot's cache index: two blocks sharing an index
    would silently overwrite each other's keys and values."""
    for m in layer.modules():
        if hasattr(m, "layer_idx"):
            m.layer_idx = index


def build(
    recipe: Recipe | Plan | Path | str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    weights: str | Path | None = None,
    load_tokenizer: bool = True,
    policy: AccessPolicy = LOCAL,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> FusedModel:
    """Turn a recipe (a Recipe, a Plan, a Path to a recipe file, or YAML text: a str is never a path) into a
    FusedModel on one device, or spread over several GPUs and CPU offload with `device_map` ("auto", "balanced",
    "sequential" or {"slots.3": 1, ...}; `max_memory` as accelerate takes it): see mol.placement. A recipe is
    planned under `policy` (see mol.plan); a Plan keeps the policy it was made under."""
    the_plan = recipe if isinstance(recipe, Plan) else plan(to_recipe(recipe), policy=policy)
    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = dtypes.to_torch(dtypes.WEIGHT_NAMES[dtype])
    dtype = dtype or default_dtype(device)
    placement = None
    if device_map is not None:
        from mol.placement import plan_placement

        placement = plan_placement(the_plan, device_map, max_memory, dtype, device)
        device = placement.main
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
    return model


def _build(the_plan: Plan, device: torch.device, dtype: torch.dtype, placement=None) -> FusedModel:
    recipe = the_plan.recipe
    base = the_plan.base
    with ExitStack() as stack:
        readers = {a: TensorReader(s, stack) for a, s in the_plan.sources.items()}
        for alias, infos in the_plan.reads.items():  # disk reads overlap building the modules
            readers[alias].prefetch(infos)
        shells = {a: layout.shell(s) for a, s in the_plan.sources.items()}
        placed: dict[
            tuple, dict
        ] = {}  # (alias, device) -> tensors already read: a repeated layer shares them

        def part(alias: str, path: str | None, device: torch.device = device) -> nn.Module | None:
            mod = layout.part(shells[alias], path)
            if mod is None:
                return None
            return _fill(mod, path, readers[alias], device, dtype, placed.setdefault((alias, device), {}))

        fam = base.family
        embed = part(base.alias, fam.embed)
        if fam.embedding_scale_buffer:  # computed at construction, saved nowhere: still on the meta device
            embed.register_buffer(
                fam.embedding_scale_buffer,
                torch.tensor(float(base.config.hidden_size) ** 0.5, device=device),
                persistent=False,
            )
        final_norm = part(base.alias, fam.final_norm)
        positions = part(base.alias, fam.positions)
        project_in = part(base.alias, fam.project_in)
        project_out = part(base.alias, fam.project_out)
        head_part = layout.head(base, shells[base.alias])
        if head_part is not None:
            head = _fill(
                *head_part, readers[base.alias], device, dtype, placed.setdefault((base.alias, device), {})
            )
        else:  # tied to the input embedding
            head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False, device="meta")
            head.weight = embed.weight

        rotary: dict[str, nn.Module] = {}
        for alias, src in the_plan.sources.items():
            if src.family.rotary:
                rot_cls = type(shells[alias].get_submodule(src.family.rotary))
                rotary[alias] = (
                    rot_cls(config=layout.source_config(src), device=device)
                    if _takes_device(rot_cls)
                    else rot_cls(config=layout.source_config(src)).to(device)
                )

        foreign_positions: dict[tuple, nn.Module] = {}
        slots = []
        for sp in the_plan.slots:
            where = device if placement is None else placement.load_device(sp.index)
            blocks = []
            for e in sp.experts:
                src = the_plan.sources[e.alias]
                layer = layout.layer(src, shells[e.alias], e.layer)
                _fill(
                    layer,
                    f"{src.family.layers}.{e.layer}",
                    readers[e.alias],
                    where,
                    dtype,
                    placed.setdefault((e.alias, where), {}),
                )
                _reindex(layer, e.cache_index)
                layer.requires_grad_(False)
                adapter = None
                if e.adapter is not None:
                    adapter = make_adapter(e.adapter, base.width, e.width, recipe.adapter.rank).to(
                        device=where, dtype=dtype
                    )
                pos = None
                if e.add_positions:
                    if (e.alias, where) not in foreign_positions:
                        foreign_positions[e.alias, where] = part(
                            e.alias, src.family.positions, where
                        ).requires_grad_(False)
                    pos = foreign_positions[e.alias, where]
                mlp = layer.get_submodule(src.family.mlp) if sp.routed and src.family.mlp else None
                blocks.append(
                    ExpertBlock(
                        e.name,
                        e.alias,
                        layer,
                        cache_keyword(layer),
                        src.family.layer_takes,
                        adapter=adapter,
                        positions=pos,
                        position_offset=src.family.position_offset,
                        mlp=mlp,
                        window=e.window,
                    )
                )
            router = None
            if sp.routed:
                r = sp.slot.router
                router = make_router(r.type, base.width, len(blocks), r.top_k).to(
                    device=where, dtype=torch.float32
                )
            slots.append(FusedSlot(sp.index, blocks, router))

        multiplier, divisor = fam.scalars(base.config)
        model = FusedModel(
            the_plan,
            embed=embed,
            head=head,
            final_norm=final_norm,
            slots=slots,
            rotary=rotary,
            positions=positions,
            position_offset=fam.position_offset,
            project_in=project_in,
            project_out=project_out,
            embedding_multiplier=multiplier,
            logits_divisor=divisor,
        )
        for mod in (embed, head, final_norm, positions, project_in, project_out):
            if mod is not None:
                mod.requires_grad_(False)
        model.bytes_read = sum(r.bytes_read for r in readers.values())
        model.eval()
        if placement is not None:
            placement.apply(model)
        return model


def _takes_device(cls) -> bool:
    import inspect

    return "device" in inspect.signature(cls.__init__).parameters
