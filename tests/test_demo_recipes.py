"""The example recipes shipped in assets/recipes validate with `mol plan` and generate with `mol run` on the
embedded demo models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "assets" / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans(recipe, capsys):
    from mol.cli import main

    assert main(["plan", str(recipe)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["prose-code-token", "cross-width-base", "branches-token"])
def test_recipe_runs(name, capsys):
    from mol.cli import main

    recipe = ROOT / "assets" / "recipes" / f"{name}.yaml"
    assert main(["run", str(recipe), "-p", "def read(path):", "-n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def read(path):")
    assert "routing" in out
