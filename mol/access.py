"""Where models may come from and what may be done with their files: an `AccessPolicy`, passed explicitly to
`mol.plan` / `mol.build` (and on to source resolution and every file check). The library reads no setting of
its own for this; the default is unrestricted local use (any folder, the Hub, but no pickles and no remote
code). A server that serves many visitors (the studio in hosted mode) builds a restricted one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mol.errors import AccessError


@dataclass(frozen=True)
class AccessPolicy:
    """`allowed_dirs` empty means any folder (local use); else every model folder, and every file it leads to
    (symlinks and shard indexes included), must resolve inside one of them. `allow_hub`: Hub ids may resolve
    (with `allowed_dirs`, their cache snapshots are allowed too). `allow_bin`: PyTorch pickle (.bin) weights
    may be loaded (weights_only). `allow_remote_code`: a model's own Python code may run (transformers'
    trust_remote_code)."""

    allowed_dirs: tuple[Path, ...] = field(default_factory=tuple)
    allow_hub: bool = True
    allow_bin: bool = False
    allow_remote_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_dirs", tuple(Path(os.path.realpath(d)) for d in self.allowed_dirs))

    @property
    def restricted(self) -> bool:
        return bool(self.allowed_dirs)

    def check_local(self, ref: str, folder: Path) -> None:
        """Refuse a local model folder outside the allow-list (`..` tricks and symlinks resolve first)."""
        if not self.restricted:
            return
        from mol.sources import one_line

        shown = one_line(ref, 200)  # a client's string, echoed in one line
        if ".." in Path(ref).parts:
            raise AccessError(
                f"Model path '{shown}' uses '..'; in hosted mode name a model inside the allowed folders."
            )
        if _inside(folder, self.allowed_dirs):
            return
        names = ", ".join(
            sorted(p.name for d in self.allowed_dirs if d.is_dir() for p in d.iterdir() if p.is_dir())
        )
        raise AccessError(
            f"Model path '{shown}' is outside the folders this server allows. Available models: {names}."
        )

    def check_file(self, path: Path, folder: Path) -> None:
        """Refuse a file of the model folder `folder` (config, tokenizer, shard, or what an index names) whose
        real path, symlinks resolved, is outside the allowed folders: the folder being allowed says nothing of
        where its files lead."""
        if not self.restricted:
            return
        roots = list(self.allowed_dirs)
        if self.allow_hub:  # Hub snapshots are links into the cache's blobs
            from huggingface_hub.constants import HF_HUB_CACHE

            roots.append(Path(os.path.realpath(HF_HUB_CACHE)))
        if not _inside(path, roots):
            try:
                name = path.relative_to(folder)
            except ValueError:
                name = path.name
            raise AccessError(
                f"'{name}' in model folder '{folder.name}' leads outside the folders this server "
                "allows; it is not read."
            )

    def check_hub(self, ref: str) -> None:
        if self.restricted and not self.allow_hub:
            raise AccessError(
                f"'{ref}': this server does not load models from the Hub; use one of its own models."
            )


LOCAL = AccessPolicy()  # the default: unrestricted local use


def _inside(path: Path, roots: list[Path] | tuple[Path, ...]) -> bool:
    """Whether `path`, symlinks resolved, is one of `roots` or inside one."""
    try:
        real = Path(os.path.realpath(path))  # never raises on a loop (Path.resolve does)
    except ValueError:  # a NUL byte: no file has that name
        return False
    return any(real == d or d in real.parents for d in roots)
