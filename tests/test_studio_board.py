"""The recipe board's operations and YAML conversions (what the API endpoints and the board widget do)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mol.errors import RecipeError
from mol.recipe import Recipe
from studio import draft_recipe as rb

MODELS = {"bard": "assets/models/mango-bard", "coder": "assets/models/mango-coder"}


def slots(*groups):
    return [
        {"experts": list(g), "router": {"type": "token", "top_k": 1} if len(g) > 1 else None} for g in groups
    ]


def test_add_slot_appends_and_inserts():
    s = rb.add_slot([], "bard:0")
    s = rb.add_slot(s, "bard:2")
    s = rb.add_slot(s, "coder:1", index=1)
    assert [x["experts"] for x in s] == [["bard:0"], ["coder:1"], ["bard:2"]]
    assert all(x["router"] is None for x in s)


def test_add_expert_makes_a_token_routed_slot_and_refuses_duplicates():
    s = rb.add_expert(slots(["bard:1"]), 0, "coder:1")
    assert s == [{"experts": ["bard:1", "coder:1"], "router": {"type": "token", "top_k": 1}}]
    with pytest.raises(RecipeError, match="already has expert 'coder:1'"):
        rb.add_expert(s, 0, "coder:1")
    with pytest.raises(RecipeError, match="no slot 3"):
        rb.add_expert(s, 3, "bard:0")


def test_remove_expert_back_to_plain_and_last_expert_removes_the_slot():
    s = rb.remove_expert(slots(["bard:1", "coder:1"], ["bard:2"]), 0, "coder:1")
    assert s[0] == {"experts": ["bard:1"], "router": None}
    s = rb.remove_expert(s, 0, "bard:1")
    assert [x["experts"] for x in s] == [["bard:2"]]
    with pytest.raises(RecipeError):
        rb.remove_expert(s, 0, "bard:9")


def test_move_and_remove_slot():
    s = slots(["bard:0"], ["bard:1"], ["bard:2"])
    assert [x["experts"][0] for x in rb.move_slot(s, 0, 2)] == ["bard:1", "bard:2", "bard:0"]
    assert [x["experts"][0] for x in rb.move_slot(s, 2, 0)] == ["bard:2", "bard:0", "bard:1"]
    assert [x["experts"][0] for x in rb.move_slot(s, 1, 99)] == ["bard:0", "bard:2", "bard:1"]
    assert [x["experts"][0] for x in rb.remove_slot(s, 1)] == ["bard:0", "bard:2"]
    assert [x["experts"][0] for x in s] == ["bard:0", "bard:1", "bard:2"]  # inputs are never mutated


def test_set_router_checks_its_arguments():
    s = slots(["bard:1", "coder:1", "coder:2"])
    assert rb.set_router(s, 0, "token", 2)[0]["router"] == {"type": "token", "top_k": 2}
    assert rb.set_router(s, 0, "pooled", 3)[0]["router"] == {"type": "pooled", "top_k": 1}
    with pytest.raises(RecipeError, match="between 1 and 3"):
        rb.set_router(s, 0, "token", 4)
    with pytest.raises(RecipeError, match="not one of"):
        rb.set_router(s, 0, "soft", 1)
    with pytest.raises(RecipeError, match="one expert"):
        rb.set_router(slots(["bard:0"]), 0, "token", 1)


@given(
    st.lists(st.sampled_from(["bard:0", "bard:1", "coder:0", "coder:2"]), min_size=1, max_size=8),
    st.integers(0, 10),
    st.integers(0, 10),
)
def test_move_slot_is_a_permutation(experts, i, j):
    s = [{"experts": [e], "router": None} for e in experts]
    i %= len(s)
    moved = rb.move_slot(s, i, j)
    assert sorted(x["experts"][0] for x in moved) == sorted(experts)
    assert moved[min(j, len(s) - 1)] == s[i]


def test_draft_lists_only_used_models_and_round_trips_through_recipe():
    draft = rb.draft_recipe(
        "d",
        "bard",
        "bottleneck",
        16,
        {**MODELS, "base": "assets/models/mango-base"},
        slots(["bard:0"], ["bard:1", "coder:1"]),
    )
    assert draft["models"] == MODELS
    assert draft["adapter"] == {"type": "bottleneck", "rank": 16}
    recipe = Recipe.from_dict(yaml.safe_load(rb.draft_yaml(draft)))
    assert [str(e) for e in recipe.slots[1].experts] == ["bard:1", "coder:1"]
    assert recipe.slots[1].router.type == "token"
    assert rb.slots_of(recipe) == slots(["bard:0"], ["bard:1", "coder:1"])


@pytest.mark.parametrize("rank", [1e300, float("nan"), -3, 65537, 2.5, 10**400])
def test_board_refuses_a_rank_no_recipe_can_hold_where_it_comes_in(rank):
    with pytest.raises(RecipeError, match="bottleneck rank must be a whole number") as err:
        rb.draft_recipe("d", "bard", "bottleneck", rank, MODELS, slots(["bard:0"]))
    assert "\n" not in str(err.value) and len(str(err.value)) < 120


@pytest.mark.parametrize("top_k", [10**300, 3, 0.5])
def test_board_refuses_a_top_k_beyond_its_experts(top_k):
    board = slots(["bard:1", "coder:1"])
    board[0]["router"] = {"type": "token", "top_k": top_k}
    with pytest.raises(RecipeError, match="top_k must be a whole number"):
        rb.draft_recipe("d", "bard", "linear", None, MODELS, board)


def test_mergekit_passthrough_import():
    text = """
slices:
  - sources:
      - model: org/Mango-7B
        layer_range: [0, 3]
  - sources:
      - model: ./models/other
        layer_range: [1, 3]
  - sources:
      - model: org/Mango-7B
        layer_range: [2, 4]
merge_method: passthrough
dtype: bfloat16
"""
    recipe, notes = rb.parse_recipe_text(text)
    assert recipe.name == "mergekit-import"
    assert any("bfloat16" in n for n in notes)
    assert recipe.models == {"Mango-7B": "org/Mango-7B", "other": "./models/other"}
    assert recipe.base == "Mango-7B"
    assert [str(s.experts[0]) for s in recipe.slots] == [
        "Mango-7B:0",
        "Mango-7B:1",
        "Mango-7B:2",
        "other:1",
        "other:2",
        "Mango-7B:2",
        "Mango-7B:3",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("slices: []\nmerge_method: passthrough", "non-empty"),
        (
            "slices:\n  - sources: [{model: a/b, layer_range: [3, 1]}]\nmerge_method: passthrough",
            "layer_range",
        ),
        (
            "slices:\n  - sources: [{model: a/b, layer_range: [0, 1]}, {model: c/d, layer_range: [0, 1]}]\n"
            "merge_method: passthrough",
            "exactly one source",
        ),
        ("slices:\n  - sources: [{model: a/b, layer_range: [0, 1]}]\nmerge_method: slerp", "passthrough"),
        ("name: x\nslots: [bard:0\n", "not valid YAML"),
    ],
)
def test_bad_imports_say_what_is_wrong(text, message):
    with pytest.raises(RecipeError, match=message):
        rb.parse_recipe_text(text)


def test_alias_for_makes_free_valid_aliases():
    assert rb.alias_for("assets/models/mango-bard", {}) == "bard"
    assert rb.alias_for("org/7b-model", {}) == "m_7b-model"
    assert rb.alias_for("org/bard", {"bard": "x"}) == "bard_2"
    assert rb.ALIAS_RE.match(rb.alias_for("org/we!rd name", {}))
