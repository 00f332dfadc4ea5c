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
        return cls(allowed_dirs=[d.resolve() for d in dirs], allow_hub=allow_hub, limits=Limits.from_env(),
                   enforce_limits=True)

    @property
    def restricted(self) -> bool:
        return bool(self.allowed_dirs)

    def check_local(self, ref: str, folder: Path) -> None:
        """Refuse a local model folder outside the allow-list (`..` tricks and symlinks resolve first)."""
        if not self.restricted:
            return
        if ".." in Path(ref).parts:
            raise AccessError(f"Model path '{ref}' uses '..'; in hosted mode name a model inside the allowed folders.")
        real = folder.resolve()
        for d in self.allowed_dirs:
            if real == d or d in real.parents:
                return
        names = ", ".join(sorted(p.name for d in self.allowed_dirs if d.is_dir() for p in d.iterdir() if p.is_dir()))
        raise AccessError(f"Model path '{ref}' is outside the folders this server allows. Available models: {names}.")

    def check_hub(self, ref: str) -> None:
        if self.restricted and not self.allow_hub:
            raise AccessError(f"'{ref}': this server does not load models from the Hub; use one of its own models.")

    def check_recipe(self, recipe) -> None:
        if not self.enforce_limits:
            return
        lim = self.limits
        if len(recipe.slots) > lim.slots:
            raise ResourceError(f"The recipe has {len(recipe.slots)} slots; this server allows at most {lim.slots}.")
        if len(recipe.models) > lim.models:
            raise ResourceError(f"The recipe names {len(recipe.models)} models; this server allows at most {lim.models}.")
        worst = max(len(s.experts) for s in recipe.slots)
        if worst > lim.experts_per_slot:
            raise ResourceError(f"A slot has {worst} experts; this server allows at most {lim.experts_per_slot}.")

    def check_generation(self, prompt: str, max_new_tokens: int) -> None:
        if not self.enforce_limits:
            return
        if len(prompt) > self.limits.prompt_chars:
            raise ResourceError(f"The prompt has {len(prompt)} characters; this server allows {self.limits.prompt_chars}.")
        if max_new_tokens > self.limits.new_tokens:
            raise ResourceError(f"{max_new_tokens} new tokens requested; this server allows {self.limits.new_tokens}.")


def current_policy() -> AccessPolicy:
    return AccessPolicy.from_env()
