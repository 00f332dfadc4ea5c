"""Lanes recipes in the studio: the board's draft of lanes, stitches and the output mixture (studio.draft_recipe),
lane renames, the adapter setting (shown only where a lane takes another model's layer), the YAML <-> board round
trip, the drawn model (studio.diagram), plan errors from mol, the mixture row of the routing figures, and the
shipped lanes fusions seeded and offered first."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mol
from mol.errors import RecipeError
from mol.recipe import Recipe
from studio import draft_recipe as dr
from studio.controller import edit_lanes_yaml
from studio.diagram import plan_info, recipe_svg
from studio.figures import expert_load, routing_heatmap
from studio.tabs.common import trace_colors

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "assets" / "recipes"
SHIPPED_LANES = ["lanes-trio.yaml", "lanes-branches.yaml"]
STITCHED = """
name: stitched
models: {bard: ../models/mango-bard, coder: ../models/mango-coder, base: ../models/mango-base}
adapter: {type: bottleneck, rank: 16}
lanes:
  bard: {base: bard, slots: ["bard:0", ["bard:1", "base:1"], "bard:2-3"]}
  code: {base: coder, slots: ["coder:0-3", {experts: ["coder:4", "coder:5"], router: {type: pooled}}]}
  base: {base: base}
stitches:
  - {from: code, to: bard, after: [3, 2], type: lowrank, rank: 8}
  - {from: base, to: code, after: [1, 0]}
mixture: {type: sequence}
"""


def _through_the_board(recipe: Recipe) -> Recipe:
    """The recipe as the board holds it (sent to the browser and back as JSON), then as the board writes it."""
    value = json.loads(json.dumps(dr.board_value(recipe, [])))
    draft = dr.board_draft(
        recipe.name, recipe.base, recipe.adapter.type, recipe.adapter.rank, dict(recipe.models), value
    )
    return Recipe.from_dict(draft)


@pytest.mark.parametrize("name", SHIPPED_LANES)
def test_shipped_lanes_recipes_round_trip_through_the_board(name):
    recipe = Recipe.from_file(RECIPES / name)
    assert recipe.lanes and not recipe.slots
    back = _through_the_board(recipe)
    assert back.to_dict() == recipe.to_dict() and back.to_yaml() == recipe.to_yaml()
    value = dr.board_value(recipe, [])
    assert (
        value["slots"] == [] and [ln["slots"] for ln in value["lanes"]] == [None] * 3
    )  # all layers: default


def test_stitches_lane_slots_and_a_sequence_mixture_round_trip():
    recipe = Recipe.from_yaml(STITCHED)
    value = dr.board_value(recipe, [])
    assert [ln["name"] for ln in value["lanes"]] == ["bard", "code", "base"]
    assert value["lanes"][1]["base"] == "coder" and value["lanes"][2]["slots"] is None
    assert value["lanes"][0]["slots"][1] == {
        "experts": ["bard:1", "base:1"],
        "router": {"type": "token", "top_k": 1},
    }
    assert value["stitches"][0] == {
        "from": "code",
        "to": "bard",
        "after": [3, 2],
        "type": "lowrank",
        "rank": 8,
    }
    assert value["mixture"] == "sequence"
    back = _through_the_board(recipe)
    assert back.to_dict() == recipe.to_dict()
    # a single-stream recipe is unchanged by all this
    single = Recipe.from_file(RECIPES / "prose-code-token.yaml")
    assert dr.board_lanes(dr.board_value(single, [])) is None
    assert _through_the_board(single).to_dict() == single.to_dict()


def test_lane_operations():
    part = dr.new_lanes(["bard", "coder"])
    assert [ln["name"] for ln in part["lanes"]] == ["bard", "coder"] and part["mixture"] == "evidence"
    part = dr.add_lane(part, "bard")  # a second lane on one model gets a name of its own
    assert [ln["name"] for ln in part["lanes"]] == ["bard", "coder", "bard_2"]
    part = dr.add_stitch(part, "coder", "bard", [2, 1], "lowrank", 8)
    part = dr.add_stitch(part, "bard_2", "coder", (0, 0))
    assert part["stitches"][1] == {
        "from": "bard_2",
        "to": "coder",
        "after": [0, 0],
        "type": "linear",
        "rank": None,
    }
    # a lane named after its base follows a new base, and so do its stitches
    part = dr.set_lane_base(part, "coder", "base")
    assert part["lanes"][1] == {"name": "base", "base": "base", "slots": None}
    assert [(s["from"], s["to"]) for s in part["stitches"]] == [("base", "bard"), ("bard_2", "base")]
    part = dr.set_lane_slots(part, "bard", dr.add_slot([], "bard:3"))
    assert part["lanes"][0]["slots"] == [{"experts": ["bard:3"], "router": None}]
    assert dr.set_lane_slots(part, "bard", None)["lanes"][0]["slots"] is None
    removed = dr.remove_lane(part, "bard_2")  # its stitches go with it
    assert [ln["name"] for ln in removed["lanes"]] == ["bard", "base"] and len(removed["stitches"]) == 1
    assert dr.remove_stitch(part, 0)["stitches"] == part["stitches"][1:]
    assert dr.set_mixture(part, "sequence")["mixture"] == "sequence"
    for bad in (
        lambda: dr.remove_lane(part, "nope"),
        lambda: dr.add_stitch(part, "bard", "bard", [0, 0]),
        lambda: dr.add_stitch(part, "bard", "base", [0, 0], "glue"),
        lambda: dr.add_stitch(part, "bard", "base", [-1, 0]),
        lambda: dr.remove_stitch(part, 5),
        lambda: dr.set_mixture(part, "average"),
    ):
        with pytest.raises(RecipeError):
            bad()
    with pytest.raises(RecipeError, match="lanes must be a list"):
        dr.board_lanes({"lanes": "bard"})
    with pytest.raises(RecipeError, match="Stitch 0"):
        dr.board_lanes({"lanes": [], "stitches": [{"from": "a", "to": "b", "after": "1"}]})


def test_lanes_api_operations_edit_yaml():
    text = (RECIPES / "lanes-trio.yaml").read_text()
    out = Recipe.from_yaml(edit_lanes_yaml(text, dr.add_stitch, "coder", "bard", [3, 2], "linear"))
    assert [(s.source, s.target, s.after) for s in out.stitches] == [("coder", "bard", (3, 2))]
    out = Recipe.from_yaml(edit_lanes_yaml(out.to_yaml(), dr.set_mixture, "sequence"))
    assert out.mixture.type == "sequence" and len(out.stitches) == 1
    out = Recipe.from_yaml(edit_lanes_yaml(out.to_yaml(), dr.remove_lane, "coder"))
    assert list(out.lanes) == ["bard", "base"] and out.stitches == []


def test_a_renamed_lane_takes_its_stitches_along_and_a_refused_name_changes_nothing():
    part = dr.lanes_of(Recipe.from_yaml(STITCHED))
    out = dr.rename_lane(part, "code", "  python ")  # surrounding spaces dropped
    assert [ln["name"] for ln in out["lanes"]] == ["bard", "python", "base"]
    assert {**out["lanes"][1], "name": "code"} == part["lanes"][1]  # its base and slots stay
    assert [(s["from"], s["to"]) for s in out["stitches"]] == [("python", "bard"), ("base", "python")]
    assert out["mixture"] == part["mixture"] == "sequence"  # it names no lane
    assert [ln["name"] for ln in part["lanes"]] == ["bard", "code", "base"]  # the input is never mutated
    assert dr.rename_lane(part, "code", "code") == part
    for bad, why in [
        ("", "a lane needs a name"),
        ("   ", "a lane needs a name"),
        ("base", "there is a lane 'base' already"),
        ("two words", "'two words' is not a lane name"),
        ("9lives", "'9lives' is not a lane name"),
        ("x" * 65, f"'{'x' * 65}' is not a lane name"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(f"Lane 'code' is not renamed: {why}")):
            dr.rename_lane(part, "code", bad)
    with pytest.raises(RecipeError, match="no lane 'nope'"):
        dr.rename_lane(part, "nope", "fine")
    # the rule is mol's: a name the board takes is a lane name mol takes, and the other way round
    data = Recipe.from_yaml(STITCHED).to_dict()
    for candidate in ["_x", "a.b-c", "x" * 64, "x" * 65, "9lives", "two words", "ünï", "a/b"]:
        lanes = {(candidate if k == "code" else k): v for k, v in data["lanes"].items()}
        try:
            Recipe.from_dict({**data, "lanes": lanes, "stitches": []})
            mol_takes = True
        except RecipeError:
            mol_takes = False
        assert (dr.lane_name_problem(part, "code", candidate) is None) == mol_takes, candidate
    # the API endpoint's path: recipe YAML in, recipe YAML out
    recipe = Recipe.from_yaml(STITCHED)
    back = Recipe.from_yaml(edit_lanes_yaml(recipe.to_yaml(), dr.rename_lane, "code", "python"))
    assert list(back.lanes) == ["bard", "python", "base"] and back.lanes["python"] == recipe.lanes["code"]
    assert [(s.source, s.target) for s in back.stitches] == [("python", "bard"), ("base", "python")]
    assert back.mixture == recipe.mixture


def test_the_adapter_setting_shows_only_where_a_lane_takes_another_models_layer():
    from studio.tabs.recipe import adapter_view

    assert adapter_view(dr.board_value(Recipe.from_file(RECIPES / "prose-code-token.yaml"), [])) == (True, "")
    assert adapter_view({"models": [], "slots": []}) == (True, "")
    shown, note = adapter_view(dr.board_value(Recipe.from_file(RECIPES / "lanes-trio.yaml"), []))
    assert not shown and note.startswith("No adapter for lanes: each lane runs its own model's layers")
    shown, note = adapter_view(dr.board_value(Recipe.from_yaml(STITCHED), []))  # lane bard takes base:1
    assert shown and "only to the layers a lane takes from another model (here in lane bard)" in note


def test_the_recipe_tab_hides_the_adapter_row_for_lanes_and_shows_it_for_one_stream(engine):
    from studio.app import build_app

    demo = build_app(engine)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    row, note = by_id["recipe-adapter-row"], by_id["recipe-adapter-note"]
    validate = next(f for f in demo.fns.values() if (by_id["recipe-board"]._id, "change") in f.targets)
    lanes = dr.board_value(Recipe.from_file(RECIPES / "lanes-trio.yaml"), [])
    out = validate.fn("l", "bard", "linear", 64, [], lanes, None, None)
    assert out[row]["visible"] is False and out[note]["visible"] is True
    assert "No adapter for lanes" in out[note]["value"]
    out = validate.fn("s", "bard", "linear", 64, [], {"models": [], "slots": []}, None, None)
    assert out[row]["visible"] is True and out[note]["visible"] is False


def test_plan_errors_of_a_lanes_board_are_mols(engine):
    recipe = Recipe.from_file(RECIPES / "lanes-trio.yaml")
    value = dr.board_value(recipe, [])
    value["stitches"] = [{"from": "coder", "to": "bard", "after": [9, 0], "type": "linear", "rank": None}]
    models = engine.recipe_from_file(RECIPES / "lanes-trio.yaml").models
    draft = dr.board_draft("mine", "bard", "linear", None, dict(models), value)
    report, plan = engine.check_with_plan(draft)
    assert not report.ok and plan is None
    assert report.error.startswith("stitches[0]: lane 'coder' has ")  # mol's RecipeError, as written
    value["stitches"][0]["after"] = [3, 2]
    report, plan = engine.check_with_plan(dr.board_draft("mine", "bard", "linear", None, dict(models), value))
    assert report.ok and [ln["name"] for ln in report.summary["lanes"]] == ["bard", "coder", "base"]
    assert report.summary["stitches"] == 1 and report.summary["mixture"] == "evidence"


def _svg(*args, **kwargs) -> ET.Element:
    return ET.fromstring(recipe_svg(*args, **kwargs))


def _by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def test_the_diagram_draws_lanes_stitches_and_the_mixture():
    recipe = Recipe.from_yaml(STITCHED, source_dir=RECIPES)
    root = _svg(recipe, **plan_info(mol.plan(recipe)))
    lanes = _by_class(root, "lane")
    assert [(g.get("data-lane"), g.get("data-model")) for g in lanes] == [
        ("bard", "bard"),
        ("code", "coder"),
        ("base", "base"),
    ]
    per_lane = [[e.get("data-expert") for e in _by_class(g, "expert")] for g in lanes]
    assert per_lane[0] == ["bard:0", "bard:1", "base:1", "bard:2", "bard:3"]
    assert per_lane[1] == ["coder:0", "coder:1", "coder:2", "coder:3", "coder:4", "coder:5"]
    assert per_lane[2] == [
        f"base:{i}" for i in range(8)
    ]  # a lane without slots: its base's layers, from the plan
    assert [len(_by_class(g, "embeddings")) + len(_by_class(g, "head")) for g in lanes] == [2, 2, 2]
    assert len(_by_class(lanes[0], "router")) == 1 and len(_by_class(lanes[1], "router")) == 1
    stitches = _by_class(root, "stitch")
    assert [(s.get("data-from"), s.get("data-to"), s.get("data-after")) for s in stitches] == [
        ("code", "bard", "3,2"),
        ("base", "code", "1,0"),
    ]
    [mixture] = _by_class(root, "mixture")
    assert mixture.get("data-mixture") == "sequence"
    # without a plan (the board's draft form): a lane of unknown depth is one box; with the cards' layer counts,
    # every layer
    draft = {**recipe.to_dict(), "lanes": dr.board_value(recipe, [])["lanes"]}
    assert len(_by_class(_svg(draft), "all-layers")) == 1
    assert len(_by_class(_svg(draft, layers={"base": 8}), "expert")) == 5 + 6 + 8


def _lanes_trace() -> dict:
    return {
        "tokens": ["def", " f", "(", "):"],
        "token_ids": [1, 2, 3, 4],
        "lanes": {"prose": "bard", "code": "coder"},
        "slots": [
            {
                "slot": 1,
                "router": "token",
                "experts": ["bard:1", "base:1"],
                "probs": [[0.9, 0.1]] * 4,
                "chosen": [[0]] * 4,
                "load": [1.0, 0.0],
            },
            {
                "slot": -1,
                "router": "mixture",
                "experts": ["prose", "code"],
                "probs": [[0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.4, 0.6]],
                "chosen": [[0], [1], [1], [1]],
                "load": [0.25, 0.75],
            },
        ],
    }


def test_the_heatmap_shows_the_mixture_row_in_the_lanes_colours():
    trace = _lanes_trace()
    colors = trace_colors([{"alias": "bard"}, {"alias": "coder"}, {"alias": "base"}], trace)
    assert colors["prose"] == colors["bard"] and colors["code"] == colors["coder"]
    fig = routing_heatmap(trace, colors)
    assert list(fig.layout.yaxis.ticktext) == ["slot 1", "lane mixture"]
    assert "the gate over the lanes" in fig.data[0].customdata[1][0]
    legend = {t.name: t.marker.color for t in fig.data[1:]}
    assert legend["prose"] == colors["bard"] and legend["code"] == colors["coder"]
    load = expert_load(trace, colors)
    assert [a.text for a in load.layout.annotations] == ["slot 1", "lane mixture"]
    assert list(load.data[1].x) == ["prose", "code"] and list(load.data[1].y) == [0.25, 0.75]


def _lanes_weights(folder: Path, name: str, mixed: float) -> None:
    """Weights and a run file for a shipped lanes recipe, as the bench writes them (untrained values: the test
    needs their form, not their quality)."""
    recipe = Recipe.from_file(RECIPES / f"{name}.yaml")
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    save_file(
        {k: v.contiguous() for k, v in model.trainable_state_dict().items()}, folder / f"{name}.safetensors"
    )
    record = {
        "recipe": (RECIPES / f"{name}.yaml").read_text(),
        "config": {"steps": 1, "router_init": "ridge"},
        "data": {},
        "step": 1,
        "curve": [{"step": 1, "loss": 3.0}],
        "metrics": {"steps": 1, "final_loss": 3.0, "mixed_perplexity": mixed},
    }
    (folder / f"{name}.train.json").write_text(json.dumps(record))


def test_the_shipped_lanes_fusions_are_seeded_and_offered_first(tmp_path):
    from studio.controller import StudioController
    from studio.engine import StudioConfig, StudioEngine
    from studio.seed import best_shipped_fusion, seed_shipped

    assets = tmp_path / "checkout" / "assets"
    (assets / "recipes").mkdir(parents=True)
    for p in RECIPES.glob("*.yaml"):
        shutil.copy(p, assets / "recipes" / p.name)
    shutil.copytree(ROOT / "assets" / "weights", assets / "weights")
    (assets / "models").symlink_to(ROOT / "assets" / "models", target_is_directory=True)
    for name, ppl in (("lanes-trio", 40.0), ("lanes-branches", 45.0)):
        if not (assets / "weights" / f"{name}.safetensors").exists():
            _lanes_weights(assets / "weights", name, ppl)

    engine = StudioEngine(StudioConfig(db_url=f"sqlite:///{tmp_path / 'studio.db'}"))
    report = seed_shipped(engine.repo, assets, root=ROOT)
    assert {"lanes-trio", "lanes-branches"} <= set(report.added_recipes), report.skipped
    best = best_shipped_fusion(engine.repo)
    assert best.version.recipe_name == "lanes-trio"
    ctl = StudioController(engine)
    choices = ctl.run_versions()
    assert [c[0].split(" v")[0] for c in choices[:2]] == ["lanes-trio", "lanes-branches"]  # listed first
    assert ctl.starting_version(choices) == best.version.id
    assert ctl.default_weights(best.version.id) == best.result.id

    # the Playground's run: the trained lanes model, its trace with the mixture row and the lanes' models
    updates = list(
        engine.run_prompt(best.version.id, "def f(x):", {"max_new_tokens": 4}, None, best.result.id, 2)
    )
    final = updates[-1].trace
    assert [s["slot"] for s in final["slots"]] == [-1] and final["slots"][0]["router"] == "mixture"
    assert final["slots"][0]["experts"] == ["bard", "coder", "base"]
    assert final["lanes"] == {"bard": "bard", "coder": "coder", "base": "base"}
    live = [u.trace for u in updates if not u.done and u.trace is not None]
    assert live and all(t["slots"][0]["slot"] == -1 for t in live)  # the mixture row streams too
    assert (
        live[-1]["slots"][0]["chosen"] == final["slots"][0]["chosen"][: len(live[-1]["slots"][0]["chosen"])]
    )
