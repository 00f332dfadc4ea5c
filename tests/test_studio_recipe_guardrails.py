"""The Recipe tab's guardrails, through the controller: which models can join a recipe (mol's plan says), which
saved versions are offered to run, compare order, mergekit imports reusing loaded aliases, the board kept in
the browser checked on its way back, and the header and export lines."""

from __future__ import annotations

import yaml

from studio.controller import StudioController
from studio.engine import StudioConfig, StudioEngine
from studio.tabs.recipe import editing_html, export_target_html
from tests.studio_server import make_models_dir
from tests.tiny_models import make_model, make_tokenizer


def controller(tmp_path, tiny) -> StudioController:
    models = make_models_dir(tmp_path / "models", tiny)
    return StudioController(
        StudioEngine(StudioConfig(models_dir=models, db_url=f"sqlite:///{tmp_path}/s.db"))
    )


def text(name, models, slots, base="bard"):
    return yaml.safe_dump({"name": name, "base": base, "models": models, "slots": slots})


def test_join_marks_and_runnable_versions_follow_mol_s_plan(tmp_path, tiny):
    ctl = controller(tmp_path, tiny)
    other = make_model(tmp_path / "other", "llama", 32, 2, make_tokenizer(tmp_path / "tok", vocab_size=300))
    ws, _ = ctl.add_model(ctl.initial_workspace(), str(other), "odd")
    marks = ctl.join_marks(ws, "bard")
    assert set(marks) == {"odd"} and "Tokenizers differ" in marks["odd"]
    assert set(ctl.join_marks(ws, "odd")) == {"bard", "base", "coder"}  # on odd's base the others cannot
    refs = {c["alias"]: c["ref"] for c in ws}
    bad = ctl.repo.create_recipe(
        "bad", text("bad", {"bard": refs["bard"], "odd": refs["odd"]}, ["bard:0", "odd:0"])
    )
    good = ctl.repo.create_recipe("good", text("good", {"bard": refs["bard"]}, ["bard:0"]))
    offered = [v for _, v in ctl.run_versions()]
    assert good.id in offered and bad.id not in offered


def test_compare_is_older_to_newer_and_mergekit_reuses_aliases(tmp_path, tiny):
    ctl = controller(tmp_path, tiny)
    ws = ctl.initial_workspace()
    ref = {c["alias"]: c["ref"] for c in ws}["bard"]
    v1 = ctl.repo.create_recipe("c", text("c", {"bard": ref}, ["bard:0"]))
    v2 = ctl.repo.save_version(v1.recipe_id, text("c", {"bard": ref}, ["bard:0", "bard:1"]))
    d = ctl.compare(v2.id, v1.id)  # picked the other way round
    assert (d.old.number, d.new.number) == (1, 2)
    assert [s.kind for s in d.diff.slots] == ["added"]

    mk = f"slices:\n  - sources: [{{model: {ref}, layer_range: [0, 2]}}]\nmerge_method: passthrough\n"
    recipe, notes = ctl.import_reusing_aliases(mk, ws)
    assert list(recipe.models) == ["bard"] and recipe.base == "bard"
    assert [str(e) for s in recipe.slots for e in s.experts] == ["bard:0", "bard:1"]
    assert any("keeps that alias" in n for n in notes)


def test_a_kept_board_is_checked_on_its_way_back(tmp_path, tiny):
    ctl = controller(tmp_path, tiny)
    ws = ctl.initial_workspace()
    assert ctl.restore_draft(None, ws) is None
    assert ctl.restore_draft({"slots": "nope"}, ws) is None
    assert ctl.restore_draft({"slots": []}, ws) is None
    kept = {
        "name": "x",
        "base": "bard",
        "adapter": "nonsense",
        "rank": 8,
        "slots": [{"experts": ["bard:0"], "router": None}],
        "models": {"bard": {c["alias"]: c["ref"] for c in ws}["bard"], "../bad alias": "/etc"},
        "loaded": {"recipe_id": 99, "version": 1, "version_id": 99},  # no such version: dropped
    }
    d = ctl.restore_draft(kept, ws)
    assert d["slots"] == kept["slots"] and d["adapter"] == "linear" and d["loaded"] is None
    assert [c["alias"] for c in d["workspace"]] == [c["alias"] for c in ws]


def test_header_and_export_lines():
    loaded = {"recipe_id": 1, "version": 3, "version_id": 7, "name": "r"}
    assert ">editing r v3</div>" in editing_html(loaded, "r", False, True)
    assert "editing r v3 · " in editing_html(loaded, "r", True, True)
    assert "unsaved changes" in editing_html(loaded, "r", True, True)
    assert "saved version r v3 (the board shows it)" in export_target_html(loaded, False)
    assert "not the board" in export_target_html(loaded, True)
    assert "Weights: as built" in export_target_html(loaded, False, model=True)
    assert "save the board" in export_target_html(None, False)
