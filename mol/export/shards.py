"""Streamed safetensors writing: tensors are copied one at a time (in bounded chunks) from their source files
into shards, so peak host memory stays near one chunk however large the model is. Each shard's header is
written first (shapes and dtypes are known from the sources' headers), then the data follows in order."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mol import dtypes
from mol.errors import CheckpointError
from mol.sources import TensorInfo, read_range

CHUNK_BYTES = 32 * 2**20  # copy (and cast) at most this many source bytes at a time
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the output: where its data comes from and what it becomes.

    Either `source` (a header entry of a source checkpoint, as the plan read and checked it) or `tensor` (already
    in memory: adapters, routers). `dtype` is the output dtype (floats are cast; other dtypes are copied as they
    are)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source_dtype: torch.dtype
    source: TensorInfo | None = None
    tensor: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def output_dtype(source: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and source.is_floating_point else source


def entry_from_file(name: str, source: TensorInfo, dtype: torch.dtype | None = None) -> TensorEntry:
    try:
        src = dtypes.to_torch(source.dtype)
    except KeyError:
        raise CheckpointError(f"Unsupported tensor dtype '{source.dtype}' in a source checkpoint.") from None
    return TensorEntry(name, tuple(source.shape), output_dtype(src, dtype), src, source=source)


def entry_from_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorEntry:
    t = tensor.detach()
    return TensorEntry(name, tuple(t.shape), output_dtype(t.dtype, dtype), t.dtype, tensor=t)


def parse_size(value: int | str, zero_ok: bool = False) -> int:
    """Bytes from 5000000, "500MB", "2GB", "1.5GiB" (0 only with `zero_ok`)."""
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        units = {
            "KIB": 2**10,
            "MIB": 2**20,
            "GIB": 2**30,
            "TIB": 2**40,
            "KB": 10**3,
            "MB": 10**6,
            "GB": 10**9,
            "TB": 10**12,
            "B": 1,
        }
        unit = next((u for u in units if text.endswith(u)), "")
        number, scale = (text[: -len(unit)], units[unit]) if unit else (text, 1)
        try:
            size = int(float(number) * scale)
        except (ValueError, OverflowError):  # OverflowError: inf
            raise ValueError(f"'{value}' is not a size; write e.g. 500MB or 2GB.") from None
    if size < 0 or (size == 0 and not zero_ok):
        raise ValueError(f"A size must be positive, got '{value}'.")
    return size


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Greedy split in output order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SourceReader:
    """Reads raw tensor bytes straight from safetensors files by offset (no mmap: pages read this way do not
    stay in the process's resident memory)."""

    def __init__(self):
        self._buf: memoryview | None = None

    def chunks(self, entry: TensorEntry) -> Iterable[memoryview]:
        """The output bytes of `entry`, in pieces of at most about CHUNK_BYTES."""
        if entry.tensor is not None:
            yield _to_bytes(entry.tensor.to("cpu").to(entry.dtype).contiguous())
            return
        src = entry.source
        if src.file.suffix != ".safetensors":  # opt-in pickles (allow_bin), loaded with weights_only
            from mol.sources import load_pickle

            yield _to_bytes(load_pickle(src.file)[src.name].to(entry.dtype).contiguous())
            return
        src_item = _itemsize(entry.source_dtype)
        step = max(src_item, CHUNK_BYTES // src_item * src_item)
        buffer = self._buffer(min(step, src.nbytes))
        with open(src.file, "rb", buffering=0) as fh:
            pos, end = src.offset, src.offset + src.nbytes
            while pos < end:
                want = min(step, end - pos)
                view = buffer[:want]
                read_range(fh.fileno(), pos, view, f"'{src.file}': tensor '{src.name}'")
                pos += want
                if entry.dtype == entry.source_dtype:
                    yield view  # written before the next read reuses the buffer
                else:
                    yield _to_bytes(torch.frombuffer(view, dtype=entry.source_dtype).to(entry.dtype))

    def _buffer(self, size: int) -> memoryview:
        """One reusable read buffer: a copy costs one chunk of memory, however many tensors are copied."""
        if self._buf is None or len(self._buf) < size:
            self._buf = memoryview(bytearray(size))
        return self._buf


def _to_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def write_shard(path: Path, entries: list[TensorEntry], reader: SourceReader) -> int:
    """Write one safetensors file: the header first, then each tensor's data streamed in order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": dtypes.safetensors_name(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for e in entries:
            written = 0
            for piece in reader.chunks(e):
                out.write(piece)
                written += piece.nbytes
            if written != e.nbytes:
                raise CheckpointError(f"tensor '{e.name}' produced {written} bytes, expected {e.nbytes}.")
        out.flush()
        os.fsync(out.fileno())
    return offset


def write_shards(
    folder: Path, entries: list[TensorEntry], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[dict]:
    """Write `entries` as one or more shards into `folder` (+ the index when there are several); returns
    [{file, tensors, bytes}] per shard."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate output tensor names: {dup[:3]}")
    groups = plan_shards(entries, max_shard_bytes)
    files = shard_names(len(groups))
    reader = SourceReader()
    written = []
    weight_map: dict[str, str] = {}
    for file, group in zip(files, groups, strict=True):
        size = write_shard(folder / file, group, reader)
        written.append({"file": file, "tensors": len(group), "bytes": size})
        weight_map.update({e.name: file for e in group})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(w["bytes"] for w in written)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written
