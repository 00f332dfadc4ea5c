"""Stitches between lanes: the cross-attention kind (causal, padding-aware, cached while generating) and the
closed-form fit of every kind's map, which leaves the fused model unchanged."""

import pytest
import torch

import mol
from mol.data import DomainTokens
from mol.errors import DataError, RecipeError
from mol.export import register_auto_classes
from mol.stitch_init import fit_stitches
from mol.training import TrainConfig, initialise
from tests.test_lanes import IDS, force_lane, lanes_recipe
from tests.tiny_models import assert_round_trips, greedy_by_full_forward

CROSS = {"from": "a", "to": "b", "after": [1, 0], "type": "cross-attention", "heads": 2, "rank": 32}


def models(tiny) -> dict:
    return {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}


LANES = {"a": {"base": "l"}, "b": {"base": "g"}}


def build(tiny, stitches=(), mixture="token"):
    model = mol.build(lanes_recipe(models(tiny), LANES, stitches, mixture), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.gate.proj.weight.copy_(
            torch.randn(model.gate.proj.weight.shape, generator=torch.Generator().manual_seed(1))
        )
    return model


def open_gates(model, value=0.5):
    with torch.no_grad():
        for st in model.stitches:
            st.gate.fill_(value)


def sample_tokens(n=512, seed=5) -> dict[str, DomainTokens]:
    ids = torch.randint(1, 380, (n,), generator=torch.Generator().manual_seed(seed))
    return {"text": DomainTokens("text", ids, torch.zeros(n, dtype=torch.long), ["text"])}


def test_an_untrained_cross_attention_stitch_changes_nothing_and_an_open_one_does(tiny):
    plain, stitched = build(tiny), build(tiny, [CROSS])
    st = stitched.stitches[0]
    assert st.heads == 2 and st.query.weight.shape == (32, 48) and st.key.weight.shape == (32, 64)
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, stitched(IDS).logits)
        open_gates(stitched)
        assert not torch.allclose(plain(IDS).logits, stitched(IDS).logits)


def test_the_cross_attention_is_causal(tiny):
    """A later token of the source never reaches an earlier position of the target."""
    model = build(tiny, [CROSS])
    open_gates(model)
    changed = IDS.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % 380
    with torch.no_grad():
        a, b = model(IDS).logits, model(changed).logits
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_cached_generation_equals_full_forwards_on_a_padded_batch(tiny):
    model = build(tiny, [CROSS])
    open_gates(model, 0.8)
    ids, mask = IDS[:, :7].clone(), torch.ones(2, 7, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # row 1 left-padded
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, mask, cache=cache)
        assert cache.stitches[0]["keys"].shape == (2, 2, 7, 16)  # the source's keys of every token so far
        got = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
        seq = greedy_by_full_forward(model, ids, 6, mask)
        # the padding is invisible: the padded row's real positions see what the same tokens alone see
        alone = model(ids[1:, 3:]).logits
        padded = model(ids, mask).logits[1:, 3:]
    assert got.tolist() == seq.tolist()
    assert (alone - padded).abs().max().item() <= 1e-5


def test_a_per_sequence_mixture_runs_the_stitch_source_with_its_chosen_lane(tiny):
    model = build(tiny, [CROSS], mixture="sequence")
    open_gates(model, 0.8)
    force_lane(model, 1)  # lane b, which reads lane a through the stitch
    with torch.no_grad():
        got = model.generate(IDS[:, :5], max_new_tokens=5, eos_token_id=[])
        seq = greedy_by_full_forward(model, IDS[:, :5], 5)
    assert got.tolist() == seq.tolist()


def test_a_cross_attention_recipe_round_trips_saves_and_exports(tiny, tmp_path):
    register_auto_classes()
    r = lanes_recipe(models(tiny), LANES, [CROSS, {**CROSS, "after": [3, 2], "heads": None, "rank": None}])
    assert mol.Recipe.from_yaml(r.to_yaml()) == r
    assert r.stitches[0].heads == 2 and "heads" not in r.stitches[1].to_dict()
    model = mol.build(r, device="cpu", dtype=torch.float32)
    assert model.stitches[1].heads == 1 and model.stitches[1].query.weight.shape == (48, 48)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        open_gates(model, 0.5)
        want = model(IDS).logits
    assert_round_trips(model, r, tmp_path, IDS, want)


def test_the_plan_counts_and_describes_cross_attention_stitches(tiny):
    p = mol.plan(lanes_recipe(models(tiny), LANES, [CROSS]))
    assert p.stitch_parameters() == 1 + 2 * 32 * (64 + 48)
    model = mol.build(p.recipe, device="cpu", dtype=torch.float32)
    assert p.stitch_parameters() == sum(t.numel() for t in model.stitches.parameters())
    assert "stitch a (after slot 1) -> b (after slot 0), cross-attention, 2 heads, width 32" in p.summary()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"heads": 3}, "3 heads do not divide the attention's width"),
        ({"heads": 0}, "heads must be an integer between 1"),
        ({"heads": "2"}, "heads must be an integer between 1"),
        ({"rank": 0}, "attention's width"),
        ({"type": "linear", "rank": None}, "heads applies to a cross-attention stitch only"),
        ({"type": "attention"}, "is not one of: linear, lowrank, cross-attention"),
    ],
)
def test_bad_cross_attention_stitches_are_refused(tiny, change, message):
    with pytest.raises(RecipeError, match=message):
        lanes_recipe(models(tiny), LANES, [{**CROSS, **change}])


def test_heads_must_divide_the_target_width_when_the_width_is_the_targets(tiny):
    r = lanes_recipe(models(tiny), LANES, [{**CROSS, "rank": None, "heads": 5}])  # lane b is 48 wide
    with pytest.raises(RecipeError, match="5 heads do not divide the attention's width 48"):
        mol.plan(r)


@pytest.mark.parametrize("aim", ["state", "gradient"])
def test_the_closed_form_fit_changes_nothing_and_fits_better_than_the_random_map(tiny, aim):
    stitches = [
        {"from": "a", "to": "b", "after": [1, 0]},
        {"from": "b", "to": "a", "after": [2, 3], "type": "lowrank", "rank": 8},
        {**CROSS, "after": [2, 1]},
    ]
    model = build(tiny, stitches)
    with torch.no_grad():
        want = model(IDS).logits
    report = fit_stitches(model, sample_tokens(), sample_tokens=512, seq_len=64, aim=aim)
    assert len(report) == 3
    for fit in report.values():
        assert fit["after"] < fit["before"] and fit["after"] < 1.0
    assert all(st.gate.detach().item() == 0.0 for st in model.stitches)
    assert all(p.grad is None for p in model.parameters())  # the gradient's pass leaves nothing behind
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)


def test_initialise_fits_the_stitches_when_asked(tiny):
    model = build(tiny, [CROSS])
    before = model.stitches[0].value.weight.clone()
    config = TrainConfig(stitch_init="lstsq", router_init="keep", init_tokens=256, seq_len=64)
    report = initialise(model, sample_tokens(), config)
    assert set(report["stitch_fit"]) == {"stitch 0 (a -> b)"}
    assert not torch.equal(model.stitches[0].value.weight, before)
    assert "stitch_fit" not in initialise(
        build(tiny, [CROSS]), sample_tokens(), TrainConfig(router_init="keep")
    )
    with pytest.raises(DataError, match="stitch_init"):
        TrainConfig(stitch_init="ridge")
