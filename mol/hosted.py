"""Hosted mode: the studio serves many visitors, so models come only from allow-listed folders, nothing is
unpickled, no remote code runs, and requests have size limits. On with MANGO_HOSTED=1, and automatically on a
Hugging Face Space (SPACE_ID is set there)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mol.errors import AccessError, ResourceError

ASSETS_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


def hosted() -> bool:
    flag = os.environ.get("MANGO_HOSTED")
    if flag is not None:
        return flag.lower() in ("1", "true", "yes", "on")
    return bool(os.environ.get("SPACE_ID"))


@dataclass(frozen=True)
class Limits:
    prompt_chars: int = 4000
    new_tokens: int = 256
    slots: int = 64
    experts_per_slot: int = 8
    models: int = 8
    concurrent_generations: int = 4
    upload_bytes: int = 5 * 2**20
    recipe_chars: int = 100_000

    @classmethod
    def from_env(cls) -> Limits:
        kw = {}
        for f in cls.__dataclass_fields__:
            v = os.environ.get(f"MANGO_LIMIT_{f.upper()}")
            if v is not None and v.isdigit():
                kw[f] = int(v)
        return cls(**kw)


@dataclass
class AccessPolicy:
    """Where models may come from. `allowed_dirs` empty means anything (local use)."""

    allowed_dirs: list[Path] = field(default_factory=list)
    allow_hub: bool = True
    limits: Limits = field(default_factory=Limits)
    enforce_limits: bool = False

    @classmethod
    def from_env(cls) -> AccessPolicy:
        if not hosted():
            return cls()
        dirs = [ASSETS_MODELS]
        extra = os.environ.get("MANGO_MODEL_DIRS", "")
        dirs += [Path(d) for d in extra.split(os.pathsep) if d.strip()]
        allow_hub = os.environ.get("MANGO_HOSTED_ALLOW_HUB", "0").lower() in ("1", "true", "yes")
        return cls(
            allowed_dirs=[d.resolve() for d in dirs],
            allow_hub=allow_hub,
            limits=Limits.from_env(),
            enforce_limits=True,
        )

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

    def check_recipe(self, recipe) -> None:
        if not self.enforce_limits:
            return
        lim = self.limits
        if len(recipe.slots) > lim.slots:
            raise ResourceError(
                f"The recipe has {len(recipe.slots)} slots; this server allows at most {lim.slots}."
            )
        if len(recipe.models) > lim.models:
            raise ResourceError(
                f"The recipe names {len(recipe.models)} models; this server allows at most {lim.models}."
            )
        worst = max(len(s.experts) for s in recipe.slots)
        if worst > lim.experts_per_slot:
            raise ResourceError(
                f"A slot has {worst} experts; this server allows at most {lim.experts_per_slot}."
            )

    def check_generation(self, prompt: str, max_new_tokens: int) -> None:
        if not self.enforce_limits:
            return
        if len(prompt) > self.limits.prompt_chars:
            raise ResourceError(
                f"The prompt has {len(prompt)} characters; this server allows {self.limits.prompt_chars}."
            )
        if max_new_tokens > self.limits.new_tokens:
            raise ResourceError(
                f"{max_new_tokens} new tokens requested; this server allows {self.limits.new_tokens}."
            )


def _inside(path: Path, roots: list[Path]) -> bool:
    """Whether `path`, symlinks resolved, is one of `roots` or inside one."""
    try:
        real = Path(os.path.realpath(path))  # never raises on a loop (Path.resolve does)
    except ValueError:  # a NUL byte: no file has that name
        return False
    return any(real == d or d in real.parents for d in roots)


def current_policy() -> AccessPolicy:
    return AccessPolicy.from_env()
