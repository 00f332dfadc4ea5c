"""Data parallelism on torch.distributed, for `torchrun ... -m mol train|eval` and `accelerate launch -m mol ...`.

The launcher starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `session()` joins the group they describe (NCCL on the rank's own GPU, gloo on CPU). Everything else
here is a no-op in a single process, so training and evaluation run one code path:

- training: every rank draws the whole global batch (batch_size x world rows: the rows one process with that batch
  would draw) and keeps its own block of it (`rank_rows`); each rank's loss is its share of the global batch's
  loss, so the gradients summed over the ranks (`sum_gradients`) are the single-process gradient;
- evaluation: batches of windows go round robin to the ranks (`rank_items`) and their sums are all-reduced."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from mol.errors import ResourceError


def launched() -> bool:
    """Started by torchrun / accelerate as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (of all nodes): the one that writes files and shows progress."""
    return rank() == 0


def rank_gpus(spread: bool = False) -> list[int]:
    """This rank's GPUs: its own one (cuda:LOCAL_RANK), or with `spread` (a device map per rank, for sources too
    large for one GPU) an equal share of consecutive GPUs of its node."""
    local, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    count = torch.cuda.device_count()
    if count < local_world:
        raise ResourceError(
            f"{local_world} processes per node, but {count} GPU(s) visible: start at most one per GPU."
        )
    per = count // local_world if spread else 1
    return list(range(local * per, (local + 1) * per))


def rank_max_memory() -> dict | None:
    """accelerate's `max_memory` for a device map over this rank's share of its node's GPUs (None: not launched,
    or no GPU: the map may use every GPU)."""
    if not launched() or not torch.cuda.is_available():
        return None
    return {i: torch.cuda.mem_get_info(i)[0] for i in rank_gpus(spread=True)}


@contextlib.contextmanager
def session(device: str | None = None, spread: bool = False) -> Iterator[str | None]:
    """Within the block, this process is its rank of the launched group; yields the device it runs on: `device`
    as given, else its GPU (the first of its GPUs with `spread`), else the CPU. Does nothing when not launched,
    or when the caller already joined a group."""
    if not launched() or dist.is_initialized():
        yield device
        return
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        if device in (None, "cuda"):
            device = f"cuda:{rank_gpus(spread)[0]}"
        torch.cuda.set_device(device)  # NCCL talks through the current device
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank_device(device: str | None) -> str | None:
    """`device`, or in a group on CUDA the rank's current GPU (set by `session` or the caller), not cuda:0 for all."""
    if device is None and active() and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def rank_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's consecutive block of a global batch's rows."""
    n = batch.shape[0] // world_size()
    return batch[rank() * n : (rank() + 1) * n]


def rank_items(count: int) -> range:
    """This rank's share of `count` items (round robin)."""
    return range(rank(), count, world_size())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks (a new tensor, on t's device); `t` itself alone."""
    if not active():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def count_ranks(flag: bool) -> int:
    """How many ranks say `flag`."""
    return int(all_reduce_sum(torch.tensor([float(flag)])).item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one: ranks must agree to stop, or the others wait forever."""
    return count_ranks(flag) > 0


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks, in one all-reduce (the frozen blocks have none: no DDP
    needed). A parameter no rank has a gradient for keeps none, so AdamW skips it exactly as one process would."""
    if not active() or not params:
        return
    comm = _comm_device()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat(
        [g.reshape(-1).to(comm, torch.float32) for g in grads]
        + [torch.tensor([float(p.grad is not None) for p in params], device=comm)]
    )
    dist.all_reduce(flat)
    summed, have = flat[: -len(params)].split([p.numel() for p in params]), flat[-len(params) :].tolist()
    for p, g, h in zip(params, summed, have, strict=True):
        p.grad = g.view_as(p).to(p.device, p.dtype) if h else None


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Every rank takes rank 0's values: the ranks start identical whatever their closed-form fits computed."""
    if not active() or not params:
        return
    flat = torch.cat([p.detach().reshape(-1).to(_comm_device(), torch.float32) for p in params])
    dist.broadcast(flat, src=0)
    for p, v in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.copy_(v.view_as(p))


def barrier() -> None:
    if active():
        dist.barrier()


def memory_per_rank(plan, world: int) -> dict[str, int]:
    """Bytes each of `world` data-parallel ranks holds: a whole replica (frozen weights), and the trainable parts
    three more times over (gradients, AdamW's two moments). Activations come on top, with the per-rank batch."""
    mem = plan.memory_estimate()
    return {
        "world_size": world,
        "weights": mem["weights"],
        "trainable": mem["trainable"],
        "training_state": 3 * mem["trainable"],
        "total": mem["weights"] + 4 * mem["trainable"],
    }


def memory_line(plan, world: int) -> str:
    from mol.planning import _fmt_bytes

    m = memory_per_rank(plan, world)
    return (
        f"Data parallel over {world} ranks: each rank holds the whole model, {_fmt_bytes(m['weights'])} of weights "
        f"+ {_fmt_bytes(m['trainable'])} trainable and {_fmt_bytes(m['training_state'])} of gradients and AdamW "
        f"moments = {_fmt_bytes(m['total'])} (fp32; `mol train --device-map auto` spreads it over the rank's "
        "GPUs)."
    )
