"""Hosted mode: the studio serves many visitors, so models come only from allow-listed folders, nothing is
unpickled, no remote code runs, and requests have size limits. On with MANGO_HOSTED=1, and automatically on a
Hugging Face Space (SPACE_ID is set there).

These are the studio's settings: the library reads none of them. The studio turns them into a
`mol.AccessPolicy` (`hosted_policy`) that it passes to every plan, build and model card, and checks the
request limits (`Limits`) itself before it hands anything to `mol`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mol.access import AccessPolicy
from mol.errors import ResourceError

ASSETS_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


def _on(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def hosted() -> bool:
    """MANGO_HOSTED, else whether this runs on a Space."""
    flag = os.environ.get("MANGO_HOSTED")
    if flag is not None:
        return _on(flag)
    return bool(os.environ.get("SPACE_ID"))


def model_dirs_from_env() -> list[Path]:
    """The extra folders a hosted studio loads models from (MANGO_MODEL_DIRS, os.pathsep-separated)."""
    extra = os.environ.get("MANGO_MODEL_DIRS", "")
    return [Path(d) for d in extra.split(os.pathsep) if d.strip()]


def hub_allowed_from_env() -> bool:
    """Whether a hosted studio may resolve Hub ids (MANGO_HOSTED_ALLOW_HUB; off unless set)."""
    return _on(os.environ.get("MANGO_HOSTED_ALLOW_HUB", "0"))


def hosted_policy(model_dirs: list[Path] = (), allow_hub: bool = False) -> AccessPolicy:
    """A hosted server's access policy: the embedded models and `model_dirs` only, the Hub only with
    `allow_hub`, no pickles, no remote code."""
    return AccessPolicy(
        allowed_dirs=(ASSETS_MODELS, *model_dirs),
        allow_hub=allow_hub,
        allow_bin=False,
        allow_remote_code=False,
    )


@dataclass(frozen=True)
class Limits:
    """How much one request may ask of a hosted server (each configurable as MANGO_LIMIT_<NAME>)."""

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

    def check_recipe(self, recipe) -> None:
        if len(recipe.slots) > self.slots:
            raise ResourceError(
                f"The recipe has {len(recipe.slots)} slots; this server allows at most {self.slots}."
            )
        if len(recipe.models) > self.models:
            raise ResourceError(
                f"The recipe names {len(recipe.models)} models; this server allows at most {self.models}."
            )
        worst = max(len(s.experts) for s in recipe.slots)
        if worst > self.experts_per_slot:
            raise ResourceError(
                f"A slot has {worst} experts; this server allows at most {self.experts_per_slot}."
            )

    def check_generation(self, prompt: str, max_new_tokens: int) -> None:
        if len(prompt) > self.prompt_chars:
            raise ResourceError(
                f"The prompt has {len(prompt)} characters; this server allows {self.prompt_chars}."
            )
        if max_new_tokens > self.new_tokens:
            raise ResourceError(
                f"{max_new_tokens} new tokens requested; this server allows {self.new_tokens}."
            )
