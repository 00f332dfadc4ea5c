"""The early copy of a plain frankenmerge's weights: started before the plan is made, while it is being made.

Making the plan takes seconds, nearly all of them importing transformers' model classes (Python work, under
the GIL) so that it can check every tensor against the model the config builds. The weights of a stack of one
local model's own layers, written as they are stored, are byte ranges of its safetensors files, which the kernel
copies without the GIL (mol.export.shards). What they are needs only the model's config.json (its family) and
its safetensors headers. So the export works them out from those first, and copies them on a thread of its own,
into a folder of its own beside the output, while the plan is made.

Nothing is trusted from that: once the plan exists, the export computes its tensor entries as always, and takes
the early shards only when those entries are exactly the early ones (same names, dtypes, shapes, files and byte
ranges) and the copy finished without error; otherwise it cancels the copy, deletes its folder and writes the
shards itself. The written bytes are the same either way. Where the plan fails, the early folder is deleted
too, so an export still leaves nothing behind. Only exports of at least MIN_BYTES are copied early (below that
the copy takes no time worth overlapping), and only where nothing is cast, trained or downloaded."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

MIN_BYTES = 64 * 2**20


class EarlyCopy:
    def __init__(self, folder: Path, entries: list, shard_bytes: int):
        from mol.export.shards import write_shards

        self.folder, self.entries, self.shard_bytes = folder, entries, shard_bytes
        self.cancel = threading.Event()
        self.result: list[dict] | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = write_shards(folder, entries, shard_bytes, cancel=self.cancel)
            except BaseException as exc:  # the export writes the shards itself, and reports what goes wrong
                self.error = exc

        self.thread = threading.Thread(target=run, name="mol-export-early-copy", daemon=True)
        self.thread.start()

    def take(self, entries: list, shard_bytes: int, into: Path) -> list[dict] | None:
        """The early shards, moved into `into`, when they are those of `entries`; else None, nothing left."""
        if entries != self.entries or shard_bytes != self.shard_bytes:
            self.discard()
            return None
        self.thread.join()
        if self.error is not None or self.result is None:
            self.discard()
            return None
        for path in sorted(self.folder.iterdir()):
            os.replace(path, into / path.name)
        self.folder.rmdir()
        return self.result

    def discard(self) -> None:
        self.cancel.set()
        self.thread.join()
        shutil.rmtree(self.folder, ignore_errors=True)


def start(recipe, out: Path, dtype, shard_bytes: int, limit: int, overwrite: bool) -> EarlyCopy | None:
    """An early copy of `recipe`'s standard export into a folder beside `out`, or None where there is none to
    make (anything but a plain stack of one local model's own layers written as stored, a small export, or an
    `out` or a source that the export will refuse: the export then says why, as always)."""
    try:
        return _start(recipe, Path(out), dtype, shard_bytes, limit, overwrite)
    except Exception:  # whatever is wrong here, the plan finds and reports
        return None


def _start(recipe, out: Path, dtype, shard_bytes: int, limit: int, overwrite: bool) -> EarlyCopy | None:
    from mol.export import _dtype
    from mol.export.shards import _is_raw_copy
    from mol.export.standard import standard_entries
    from mol.families import family_for
    from mol.sources import ModelSource, read_json_object, resolve_folder

    if recipe.lanes or any(s.routed or s.experts[0].model != recipe.base for s in recipe.slots):
        return None
    if not out.parent.is_dir() or (
        out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite))
    ):
        return None
    search = [recipe.source_dir] if recipe.source_dir else []
    folder, hub_id = resolve_folder(recipe.models[recipe.base], search)
    if hub_id is not None:
        return None
    raw = read_json_object(folder / "config.json", "config.json")
    family = family_for(raw["model_type"])
    base = ModelSource(
        alias=recipe.base, ref=recipe.models[recipe.base], folder=folder, config=None, family=family
    )
    slots = [
        SimpleNamespace(
            index=i, experts=[SimpleNamespace(alias=s.experts[0].model, layer=s.experts[0].layer)]
        )
        for i, s in enumerate(recipe.slots)
    ]
    light_plan = SimpleNamespace(base=base, sources={recipe.base: base}, slots=slots)
    entries = standard_entries(light_plan, _dtype(dtype, None, light_plan))
    total = sum(e.nbytes for e in entries)
    if total < MIN_BYTES or not all(_is_raw_copy(e) for e in entries):
        return None
    if (limit and total > limit) or total > shutil.disk_usage(out.parent).free:
        return None
    early = out.parent / f".{out.name}.early-{uuid.uuid4().hex[:8]}"
    early.mkdir()
    return EarlyCopy(early, entries, shard_bytes)
