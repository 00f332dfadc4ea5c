"""The model diagram: a self-contained SVG of a recipe's data flow."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mol.recipe import Recipe
from studio.diagram import plan_info, recipe_svg
from studio.figures import model_colors

NS = {"s": "http://www.w3.org/2000/svg"}
RECIPES = Path(__file__).resolve().parent.parent / "assets" / "recipes"

DRAFT = {
    "name": "prose-code",
    "base": "bard",
    "models": {"bard": "../models/mango-bard", "coder": "../models/mango-coder"},
    "adapter": {"type": "bottleneck", "rank": 16},
    "slots": [
        {"experts": ["bard:0"]},
        {"experts": ["bard:1", "coder:1"], "router": {"type": "token", "top_k": 2}},
        {"experts": ["bard:2", "coder:5", "coder:6", "bard:7"], "router": {"type": "pooled"}},
        {"experts": ["coder:3"]},
    ],
}


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def _by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def test_one_element_per_expert_in_slot_order():
    root = _parse(recipe_svg(DRAFT, widths={"bard": 256, "coder": 192}))
    experts = _by_class(root, "expert")
    assert [e.get("data-expert") for e in experts] == [
        "bard:0",
        "bard:1",
        "coder:1",
        "bard:2",
        "coder:5",
        "coder:6",
        "bard:7",
        "coder:3",
    ]
    assert [e.get("data-slot") for e in experts] == ["0", "1", "1", "2", "2", "2", "2", "3"]
    assert len(_by_class(root, "slot")) == 4
    assert len(_by_class(root, "embeddings")) == 1 and len(_by_class(root, "head")) == 1
    # the flow runs top to bottom: embeddings, the slots in order, then the head
    ys = [float(g.find("s:rect", NS).get("y")) for g in [_by_class(root, "embeddings")[0], *experts[:1]]]
    head_y = float(_by_class(root, "head")[0].find("s:rect", NS).get("y"))
    assert ys[0] < ys[1] < head_y


def test_colours_follow_the_source_model():
    colors = model_colors(["bard", "coder"])
    root = _parse(recipe_svg(DRAFT))
    for e in _by_class(root, "expert"):
        assert e.find("s:rect", NS).get("fill") == colors[e.get("data-model")]
    legend = {g.get("data-model"): g.find("s:rect", NS).get("fill") for g in _by_class(root, "source")}
    assert legend == colors
    mine = _parse(recipe_svg(DRAFT, colors={"coder": "#123456", "bard": "red; onclick"}))
    fills = {e.get("data-model"): e.find("s:rect", NS).get("fill") for e in _by_class(mine, "expert")}
    assert fills == {"bard": colors["bard"], "coder": "#123456"}  # a colour that is not hex is ignored


def test_routers_widths_and_adapters():
    root = _parse(recipe_svg(DRAFT, widths={"bard": 256, "coder": 192}, families={"bard": "llama"}))
    routers = _by_class(root, "router")
    assert [(r.get("data-router"), r.get("data-top-k")) for r in routers] == [("token", "2"), ("pooled", "1")]
    text = "".join(root.itertext())
    assert "router: token · top-2" in text and "pooled" in text and "d=256" in text and "llama" in text
    # every coder block enters bard's stream through an adapter; bard's own blocks do not
    for e in _by_class(root, "expert"):
        badges = _by_class(e, "adapter")
        assert len(badges) == (e.get("data-model") == "coder")
        if badges:
            assert badges[0].get("data-adapter") == "bottleneck" and badges[0].get("data-resize") == "true"
            assert "d=192 → 256" in "".join(e.itertext())
    # no widths known: adapters still marked (from the base), no width text invented
    bare = _parse(recipe_svg(DRAFT))
    assert {b.get("data-resize") for b in _by_class(bare, "adapter")} == {"false"}
    assert "d=" not in "".join(bare.itertext())


def test_plan_adapters_override_the_default():
    adapters = {(1, "coder:1"): None, "coder:3": "linear"}
    root = _parse(
        recipe_svg(DRAFT, widths={"bard": 64, "coder": 64}, adapters=adapters, positions={"coder:3"})
    )
    by = {(e.get("data-slot"), e.get("data-expert")): e for e in _by_class(root, "expert")}
    assert not _by_class(by[("1", "coder:1")], "adapter")
    [badge] = _by_class(by[("3", "coder:3")], "adapter")
    assert badge.get("data-adapter") == "linear" and badge.get("data-resize") == "false"
    assert "+pos" in "".join(by[("3", "coder:3")].itertext())


@pytest.mark.parametrize(
    "hostile", ["<script>alert(1)</script>", '"onload=alert(1) x="', "a&b'<svg/onload=1>"]
)
def test_hostile_names_are_escaped(hostile):
    recipe = {
        "name": hostile,
        "base": hostile,
        "models": {hostile: "x", "ok": "y"},
        "slots": [{"experts": [f"{hostile}:0", "ok:0"], "router": {"type": "token", "top_k": 1}}],
    }
    svg = recipe_svg(recipe, widths={hostile: 128, "ok": 64}, families={"ok": hostile})
    root = _parse(svg)  # well-formed: nothing broke out of an attribute or a text node
    assert "<script" not in svg and "<svg/" not in svg and 'onload="' not in svg.replace("&quot;", "")
    assert not [e for e in root.iter() if any(k.lower().startswith("on") for k in e.attrib)]
    assert {e.tag.split("}")[1] for e in root.iter()} <= {
        "svg",
        "g",
        "rect",
        "text",
        "title",
        "line",
        "polygon",
        "circle",
    }
    assert [e.get("data-model") for e in _by_class(root, "expert")] == [
        hostile,
        "ok",
    ]  # the text survives, inert
    assert hostile in "".join(root.itertext())


def test_self_contained():
    svg = recipe_svg(DRAFT)
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in svg and "href" not in svg and "@import" not in svg
    root = _parse(svg)
    assert root.get("width") == "100%" and root.get("viewBox").startswith("0 0 420 ")


def test_recipe_object_shorthands_and_a_real_plan():
    recipe = Recipe.from_file(RECIPES / "cross-width-base.yaml")
    root = _parse(recipe_svg(recipe))
    assert len(_by_class(root, "expert")) == len(recipe.slots)
    short = {"name": "s", "base": "a", "models": {"a": "x"}, "slots": ["a:0-2", ["a:3", "a:4"]]}
    root = _parse(recipe_svg(short))
    assert [e.get("data-expert") for e in _by_class(root, "expert")] == ["a:0", "a:1", "a:2", "a:3", "a:4"]
    assert len(_by_class(root, "router")) == 1


def test_plan_info_reads_a_plan():
    import mol

    recipe = Recipe.from_file(RECIPES / "cross-width-base.yaml")
    info = plan_info(mol.plan(recipe))
    assert info["widths"]["bard"] != info["widths"]["base"]
    root = _parse(recipe_svg(recipe, **info))
    resized = [b for b in _by_class(root, "adapter") if b.get("data-resize") == "true"]
    assert len(resized) == sum(1 for s in recipe.slots for e in s.experts if e.model != recipe.base) == 4
