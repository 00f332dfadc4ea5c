"""Streamed safetensors writing: tensors are copied one at a time (in bounded chunks) from their source files
into shards, so peak host memory stays near one chunk however large the model is. Each shard's header is
written first (shapes and dtypes are known from the sources' headers), then the data follows in order.

A tensor written as its source stores it (same dtype: a frankenmerge's layers, its embeddings and head) is a
byte range of a source safetensors file, and is copied as one: consecutive tensors that are also consecutive in
the same source file become one range, copied inside the kernel (`copy_file_range`, else `sendfile`, else
positioned reads into one reused buffer), so that their bytes never pass through this process. Cast tensors and
tensors in memory (adapters, routers, a trained head) go through the chunked path; the bytes written are the
same either way."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mol import dtypes
from mol.errors import CheckpointError
from mol.sources import TensorInfo, read_range

CHUNK_BYTES = 32 * 2**20  # copy (and cast) at most this many source bytes at a time
WRITEBACK_BYTES = (
    256 * 2**20
)  # a shard's written pages are flushed to disk in steps of this size while it is written
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
    stay in the process's resident memory), and copies byte ranges of them into an output file. Source files
    stay open until `close()`."""

    def __init__(self, cancel: threading.Event | None = None):
        self._buf: memoryview | None = None
        self._fds: dict[Path, int] = {}
        self._cancel = cancel  # set: the next chunk raises Cancelled (an early copy no longer wanted)
        # how ranges are copied: the fastest way that has worked so far (a file system or OS that lacks one
        # says so on the first call, which then falls back to the next for good)
        self._copy = next((way for way in _KERNEL_COPIES if hasattr(os, way)), "read")

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
        fd = self._fd(src.file)
        pos, end = src.offset, src.offset + src.nbytes
        while pos < end:
            self.check_cancel()
            want = min(step, end - pos)
            view = buffer[:want]
            read_range(fd, pos, view, f"'{src.file}': tensor '{src.name}'")
            pos += want
            if entry.dtype == entry.source_dtype:
                yield view  # written before the next read reuses the buffer
            else:
                yield _to_bytes(torch.frombuffer(view, dtype=entry.source_dtype).to(entry.dtype))

    def copy_range(self, file: Path, offset: int, nbytes: int, out_fd: int, what: str) -> None:
        """Append `nbytes` bytes of `file` from `offset` on to `out_fd` (at its position), inside the kernel
        where the OS and file systems allow it; a source that ends first fails with a CheckpointError naming
        `what`."""
        fd = self._fd(file)
        pos, end = offset, offset + nbytes
        while pos < end:
            self.check_cancel()
            want = min(end - pos, 256 * 2**20)
            try:
                if self._copy == "copy_file_range":
                    k = os.copy_file_range(fd, out_fd, want, pos)
                elif self._copy == "sendfile":
                    k = os.sendfile(out_fd, fd, pos, want)
                else:
                    view = self._buffer(min(want, CHUNK_BYTES))[: min(want, CHUNK_BYTES)]
                    read_range(fd, pos, view, what)
                    _write_all(out_fd, view)
                    k = len(view)
            except OSError as exc:
                if exc.errno in _NO_KERNEL_COPY and self._copy != "read":
                    later = _KERNEL_COPIES[_KERNEL_COPIES.index(self._copy) + 1 :]
                    self._copy = next((way for way in later if hasattr(os, way)), "read")
                    continue  # nothing was copied by the failed call: the next way starts at `pos`
                if exc.errno in _OUTPUT_FULL:
                    raise  # the output's side: staging reports it as a failed write
                raise CheckpointError(
                    f"{what} cannot be copied ({exc.strerror or type(exc).__name__}); the file may be truncated."
                ) from None
            if not k:
                raise CheckpointError(
                    f"{what} cannot be read (end of file after {pos - offset} of {nbytes} bytes); the file may "
                    "be truncated."
                )
            pos += k

    def check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the copy was cancelled")

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as exc:
                raise CheckpointError(
                    f"'{file}' cannot be read ({exc.strerror or type(exc).__name__})."
                ) from None
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _buffer(self, size: int) -> memoryview:
        """One reusable read buffer: a copy costs one chunk of memory, however many tensors are copied."""
        if self._buf is None or len(self._buf) < size:
            self._buf = memoryview(bytearray(size))
        return self._buf


_KERNEL_COPIES = ("copy_file_range", "sendfile")  # Linux (sendfile to a file: also Linux only), fastest first
# errno values that mean "this way of copying is not available here" (not "the copy failed"): old kernels,
# copies across file systems, file systems without splice support, sendfile to a file where only sockets work.
_NO_KERNEL_COPY = {
    errno.ENOSYS,
    errno.EXDEV,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.ENOTSOCK,
    errno.EBADF,
    errno.ESPIPE,
}


_OUTPUT_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _to_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def _write_all(fd: int, data: memoryview) -> None:
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _is_raw_copy(e: TensorEntry) -> bool:
    """Written exactly as the source file stores it: a byte range of a safetensors file."""
    return e.tensor is None and e.dtype == e.source_dtype and e.source.file.suffix == ".safetensors"


def copy_runs(entries: list[TensorEntry]) -> list[tuple[TensorEntry, ...]]:
    """`entries` in order, grouped: consecutive raw copies that are back to back in the same source file form
    one run (one range to copy); every other entry is a run of its own."""
    runs: list[list[TensorEntry]] = []
    for e in entries:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and _is_raw_copy(prev)
            and _is_raw_copy(e)
            and prev.source.file == e.source.file
            and prev.source.offset + prev.source.nbytes == e.source.offset
        ):
            runs[-1].append(e)
        else:
            runs.append([e])
    return [tuple(r) for r in runs]


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
    # unbuffered: kernel copies and writes share the file position
    with open(path, "wb", buffering=0) as out, _writeback(out.fileno(), offset):
        fd = out.fileno()
        _write_all(fd, memoryview(struct.pack("<Q", len(blob)) + blob))
        for run in copy_runs(entries):
            first = run[0]
            if _is_raw_copy(first):
                bad = next((e for e in run if e.source.nbytes != e.nbytes), None)
                if bad is not None:  # the plan checked the headers; a copy never writes a wrong length
                    raise CheckpointError(
                        f"tensor '{bad.name}' produced {bad.source.nbytes} bytes, expected {bad.nbytes}."
                    )
                size = sum(e.nbytes for e in run)
                what = f"'{first.source.file}': tensor '{first.source.name}'" + (
                    f" (and the {len(run) - 1} after it)" if len(run) > 1 else ""
                )
                reader.copy_range(first.source.file, first.source.offset, size, fd, what)
                continue
            written = 0
            for piece in reader.chunks(first):
                _write_all(fd, piece)
                written += piece.nbytes
            if written != first.nbytes:
                raise CheckpointError(
                    f"tensor '{first.name}' produced {written} bytes, expected {first.nbytes}."
                )
        os.fsync(fd)
    return offset


@contextmanager
def _writeback(fd: int, size: int):
    """While a large shard is written, flush its pages to disk from a thread of its own, so that the disk
    writes as the copy goes on and the final fsync has little left to wait for (the copies and fsync release
    the GIL). An error it meets is raised here: once reported to one fsync, the kernel does not report it to
    the next."""
    if size < 2 * WRITEBACK_BYTES:
        yield
        return
    sync = getattr(os, "fdatasync", os.fsync)
    done = threading.Event()
    errors: list[OSError] = []

    def run() -> None:
        synced = 0
        while not done.wait(0.02):
            try:
                now = os.fstat(fd).st_size
                if now - synced >= WRITEBACK_BYTES:
                    sync(fd)
                    synced = now
            except OSError as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=run, name="mol-export-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if errors:
        raise errors[0]


class Cancelled(Exception):
    """An early copy (mol.export.early) stopped because its shards are not wanted."""


def write_shards(
    folder: Path,
    entries: list[TensorEntry],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    cancel: threading.Event | None = None,
) -> list[dict]:
    """Write `entries` as one or more shards into `folder` (+ the index when there are several); returns
    [{file, tensors, bytes}] per shard. `cancel`: once set, the copy stops with Cancelled at its next chunk."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate output tensor names: {dup[:3]}")
    groups = plan_shards(entries, max_shard_bytes)
    files = shard_names(len(groups))
    reader = SourceReader(cancel)
    written = []
    weight_map: dict[str, str] = {}
    try:
        for file, group in zip(files, groups, strict=True):
            size = write_shard(folder / file, group, reader)
            written.append({"file": file, "tensors": len(group), "bytes": size})
            weight_map.update({e.name: file for e in group})
    finally:
        reader.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(w["bytes"] for w in written)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written
