"""Shared fixtures: tiny real checkpoints on disk (random weights, one shared tokenizer), built once per run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import make_model, make_tokenizer  # noqa: E402

# Under pytest-xdist every worker gets its share of the cores: torch's default of one thread per core in each
# worker oversubscribes the machine, and its OpenMP threads spin while they wait for a core.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_dir):
    return make_tokenizer(tiny_dir / "tokenizer")


@pytest.fixture(scope="session")
def tiny(tiny_dir, tokenizer_dir):
    """Factory: tiny(family, width=64, layers=4, **overrides) -> folder of a saved random model (cached)."""
    made: dict = {}

    def factory(family: str, width: int = 64, layers: int = 4, seed: int = 0, **overrides):
        key = (family, width, layers, seed, tuple(sorted(overrides.items())))
        if key not in made:
            name = f"{family}-w{width}-l{layers}-s{seed}" + "".join(
                f"-{k}{v}" for k, v in sorted(overrides.items())
            )
            made[key] = make_model(
                tiny_dir / name, family, width, layers, tokenizer_dir, seed=seed, **overrides
            )
        return made[key]

    return factory


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny):
    """Test-size copies of the demo family under the shipped names, made once per test module."""
    from tests.studio_server import make_models_dir

    return make_models_dir(tmp_path_factory.mktemp("studio-models"), tiny)


@pytest.fixture
def engine(models_dir, tmp_path):
    """A studio engine over `models_dir`, with a fresh database of its own."""
    from studio.engine import StudioConfig, StudioEngine

    return StudioEngine(StudioConfig(models_dir=models_dir, db_url=f"sqlite:///{tmp_path / 'studio.db'}"))
