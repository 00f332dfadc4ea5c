"""The studio's layout: tabs do not import each other, the Train tab starts at mol's training defaults, the
recipe rules are mol's, and callbacks answer with {component: value} maps."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import mol
import mol.recipe
from studio import draft_recipe

TABS = Path(__file__).resolve().parents[1] / "studio" / "tabs"
TAB_MODULES = {p.stem for p in TABS.glob("*.py") if p.stem not in ("__init__", "common")}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from studio.tabs import train`
    return out


def test_no_tab_module_imports_another_tab_module():
    assert TAB_MODULES >= {"models", "recipe", "playground", "train", "evaluate"}
    for path in TABS.glob("*.py"):
        tabs = {m for m in imported_modules(path) if m.startswith("studio.tabs.")}
        others = {m.split(".")[2] for m in tabs} & (TAB_MODULES - {path.stem})
        assert not others, f"{path.name} imports the tab module(s) {sorted(others)}"


def test_the_draft_recipe_model_is_not_a_tab():
    assert not (TABS / "recipe_board.py").exists()
    assert draft_recipe.ALIAS_RE is mol.recipe.ALIAS_RE  # mol's rule, not a copy


@pytest.fixture
def demo(engine):
    from studio.app import build_app

    return build_app(engine)


def component(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_the_train_tab_starts_at_mol_training_defaults(demo):
    defaults = mol.TrainConfig()
    shown = {
        "steps": "train-steps",
        "batch_size": "train-batch",
        "seq_len": "train-seq-len",
        "seed": "train-seed",
        "lr": "train-lr",
        "router_lr": "train-router-lr",
        "aux_loss_weight": "train-aux",
        "adapter_init": "train-adapter-init",
        "router_init": "train-router-init",
    }
    names = {f.name for f in dataclasses.fields(mol.TrainConfig)}
    assert set(shown) <= names
    for name, elem_id in shown.items():
        assert component(demo, elem_id).value == getattr(defaults, name), name
    from mol.router_init import ROUTER_INITS
    from mol.training import ADAPTER_INITS

    assert [c[1] for c in component(demo, "train-adapter-init").choices] == list(ADAPTER_INITS)
    assert [c[1] for c in component(demo, "train-router-init").choices] == list(ROUTER_INITS)


def test_the_recipe_and_export_choices_are_mol_s(demo):
    from mol.export import FORMATS

    assert [c[1] for c in component(demo, "recipe-adapter").choices] == list(mol.recipe.ADAPTER_TYPES)
    assert component(demo, "recipe-rank").value == mol.recipe.DEFAULT_BOTTLENECK_RANK
    assert [c[1] for c in component(demo, "export-format").choices] == list(FORMATS)


def block_fn(demo, api_name: str):
    return next(f for f in demo.fns.values() if f.api_name == api_name)


def test_a_callback_answers_with_a_map_of_its_output_components(demo):
    add = block_fn(demo, "ui_add_model")
    refused = add.fn([], "", "")  # no reference: an inline error, the rest as it was
    assert isinstance(refused, dict) and set(refused) <= set(add.outputs)
    status = component(demo, "model-status")
    assert 'role="alert"' in refused[status] and component(demo, "model-list") not in refused

    compare = block_fn(demo, "ui_compare_versions")
    result = compare.fn(None, None)
    assert set(result) == set(compare.outputs)
    assert "Pick two versions" in result[component(demo, "versions-status")]


def test_a_streaming_callback_yields_maps_of_its_output_components(demo):
    run = block_fn(demo, "ui_run_prompt")
    (only,) = list(run.fn(None, 0, "To be", 4, False, 1.0, 0, 1.0, 0, []))
    assert set(only) == {component(demo, "run-status")}
    assert "Pick a saved recipe version" in only[component(demo, "run-status")]
