"""Recipe parsing: canonical form round-trips, shorthands expand, malformed input fails with a clear message."""

import pytest

import mol
from mol.errors import RecipeError

CANONICAL = """
name: prose-code
base: bard
models:
  bard: assets/models/mango-bard
  coder: assets/models/mango-coder
adapter: {type: linear}
slots:
  - experts: ["bard:0"]
  - experts: ["bard:1", "coder:1"]
    router: {type: token, top_k: 1}
  - experts: ["bard:2", "coder:5"]
    router: {type: pooled}
"""


def test_canonical_round_trip():
    r = mol.Recipe.from_yaml(CANONICAL)
    assert r.name == "prose-code" and r.base == "bard"
    assert [str(e) for e in r.slots[1].experts] == ["bard:1", "coder:1"]
    assert r.slots[0].router is None
    assert r.slots[2].router == mol.RouterSpec("pooled", 1)
    again = mol.Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.to_yaml() == r.to_yaml()


def test_shorthands_expand_to_canonical():
    r = mol.Recipe.from_yaml("""
name: short
models: {a: x, b: y}
adapter: bottleneck
slots:
  - a:0-2
  - [a:3, b:1]
  - {experts: [a:4, b:2], router: pooled}
  - b:3
""")
    assert r.base == "a"  # first model by default
    assert [str(s.experts[0]) for s in r.slots[:3]] == ["a:0", "a:1", "a:2"]
    assert r.slots[3].router == mol.RouterSpec("token", 1)
    assert r.slots[4].router.type == "pooled"
    assert r.adapter == mol.AdapterSpec("bottleneck", 64)
    assert len(r.slots) == 6


def test_python_constructor_matches_yaml():
    r = mol.Recipe(name="p", base="a", models={"a": "x"}, slots=[mol.Slot((mol.ExpertRef("a", 0),))])
    assert mol.Recipe.from_yaml(r.to_yaml()) == r


def test_a_layer_may_be_used_twice():
    r = mol.Recipe.from_yaml("name: r\nmodels: {a: x}\nslots: [a:0, a:1, a:0]")
    assert [str(s.experts[0]) for s in r.slots] == ["a:0", "a:1", "a:0"]


@pytest.mark.parametrize("text, message", [
    ("name: x\nmodels: {a: p}\nslots: [a:0]\n  bad: [", "line"),
    ("models: {a: p}\nslots: [a:0]", "needs 'name'"),
    ("name: x\nmodels: {a: p}\nslots: []", "needs 'slots'"),
    ("name: x\nmodels: {a: p}\nslots: [c:0]", "unknown model alias 'c'"),
    ("name: x\nbase: z\nmodels: {a: p}\nslots: [a:0]", "base 'z'"),
    ("name: x\nmodels: {a: p}\nslots: [a:-1]", "negative"),
    ("name: x\nmodels: {a: p}\nslots: [a]", "alias:layer"),
    ("name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {top_k: 3}}]", "top_k=3"),
    ("name: x\nmodels: {a: p}\nslots: [{experts: []}]", "non-empty"),
    ("name: x\nmodels: {a: p}\nslots: [a:0]\ncolour: red", "Unknown recipe key"),
    ("name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {type: magic}}]", "router.type"),
    ("name: x\nmodels: {a: p}\nadapter: {type: linear, rank: 4}\nslots: [a:0]", "bottleneck adapter only"),
    ("name: x\nmodels: {a: p}\nslots: [{experts: [a:0, a:0]}]", "same expert twice"),
    ("- just\n- a list", "mapping"),
    ("name: x\nmodels: {'bad alias!': p}\nslots: ['bad alias!:0']", "not allowed"),
])
def test_malformed_recipes_fail_clearly(text, message):
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_yaml(text)
    assert message in str(info.value)


def test_yaml_error_names_the_line():
    with pytest.raises(RecipeError, match=r"line 2"):
        mol.Recipe.from_yaml("name: x\nmodels: {a: p}}\nslots: [a:0]\n")


def test_yaml_alias_bomb_is_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "name: x\nmodels: {m: p}\nslots: *i\n"
    with pytest.raises(RecipeError, match="too large"):
        mol.Recipe.from_yaml(bomb)


def test_messages_about_huge_values_stay_short():
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_dict({"name": "x", "models": {"a": "p"}, "slots": [list(range(5000))]})
    assert len(str(info.value)) < 300
