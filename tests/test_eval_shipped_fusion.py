"""The shipped trained fusion (assets/recipes/fused-token.yaml + assets/weights/fused-token.safetensors) loads and
routes by domain: code to the code specialist's blocks, prose to the prose specialist's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mol

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "assets" / "recipes" / "fused-token.yaml"
WEIGHTS = ROOT / "assets" / "weights" / "fused-token.safetensors"

pytestmark = pytest.mark.skipif(
    not (RECIPE.is_file() and WEIGHTS.is_file() and (ROOT / "assets" / "models" / "mango-base").is_dir()),
    reason="demo models or shipped fusion weights not present",
)

CODE = "def read_config(path):\n    with open(path) as fh:\n        return json.load(fh)\n"
PROSE = "KING HENRY. Good morrow, my lord. What news from France, and how fares the king?\n"


@pytest.fixture(scope="module")
def fused():
    return mol.build(RECIPE, device="cpu", dtype=torch.float32, weights=WEIGHTS)


def first_choice_share(model, text: str, alias: str) -> float:
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trace = model(ids).trace
    shares = []
    for st in trace.slots:
        want = [i for i, name in enumerate(st.experts) if name.startswith(alias + ":")]
        shares.append(float(torch.isin(st.chosen[..., 0], torch.tensor(want)).float().mean()))
    return sum(shares) / len(shares)


def test_shipped_fusion_routes_code_to_the_coder_and_prose_to_the_bard(fused):
    assert len(fused.routed_slots) == 3
    assert first_choice_share(fused, CODE, "coder") > 0.8
    assert first_choice_share(fused, PROSE, "bard") > 0.8


def test_shipped_weights_are_trained_not_the_closed_form(fused):
    fresh = mol.build(RECIPE, device="cpu", dtype=torch.float32)
    trained = fused.trainable_state_dict()
    outs = [k for k in trained if k.endswith("out_of_block.weight")]
    assert outs and all(
        trained[k].abs().sum() > 0 for k in outs
    )  # the zero-initialised maps out were trained
    assert any(not torch.equal(trained[k], v) for k, v in fresh.trainable_state_dict().items())
