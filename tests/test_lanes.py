"""Lanes: several sources side by side, each on its own stream with its own head, joined by stitches and an output
mixture of their next-token distributions. Checked against transformers' own models and hand computations."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mol
from mol.errors import RecipeError
from mol.export import register_auto_classes
from tests.tiny_models import assert_round_trips, greedy_by_full_forward

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "opt", "phi"]


def lanes_recipe(models: dict, lanes: dict, stitches=(), mixture="token", name="lanes"):
    return mol.Recipe.from_dict(
        {"name": name, "models": models, "lanes": lanes, "stitches": list(stitches), "mixture": mixture}
    )


def reference_logp(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float().log_softmax(-1)


def force_lane(model, index, strength=1e4):
    with torch.no_grad():
        model.gate.proj.weight.zero_()
        model.gate.proj.bias.fill_(-strength)
        model.gate.proj.bias[index] = strength


IDS = torch.randint(1, 380, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lane_alone_is_its_source(tiny, family):
    """With the gate all on one lane, the fused distribution is that lane's source model's, exactly."""
    other, base = tiny(family, width=48), tiny("llama")
    r = lanes_recipe({"o": str(other), "l": str(base)}, {"own": {"base": "o"}, "main": {"base": "l"}})
    model = mol.build(r, device="cpu", dtype=torch.float32)
    for index, folder in enumerate((other, base)):
        force_lane(model, index)
        with torch.no_grad():
            got = model(IDS).logits
        assert (got - reference_logp(folder, IDS)).abs().max().item() <= 1e-5


def test_an_untrained_stitch_changes_nothing_and_a_trained_one_does(tiny):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    lanes = {"a": {"base": "l"}, "b": {"base": "g"}}
    plain = mol.build(lanes_recipe(models, lanes), device="cpu", dtype=torch.float32)
    stitched = mol.build(
        lanes_recipe(
            models, lanes, [{"from": "b", "to": "a", "after": [1, 2], "type": "lowrank", "rank": 8}]
        ),
        device="cpu",
        dtype=torch.float32,
    )
    with torch.no_grad():
        for m in (plain, stitched):
            m.gate.proj.weight.copy_(
                torch.randn(m.gate.proj.weight.shape, generator=torch.Generator().manual_seed(1))
            )
        assert torch.equal(plain(IDS).logits, stitched(IDS).logits)
        stitched.stitches[0].gate.fill_(0.5)
        assert not torch.allclose(plain(IDS).logits, stitched(IDS).logits)


def test_the_mixture_loss_is_the_marginal_likelihood(tiny):
    folders = {"l": tiny("llama"), "g": tiny("gpt2", width=48)}
    r = lanes_recipe({k: str(v) for k, v in folders.items()}, {"a": {"base": "l"}, "b": {"base": "g"}})
    model = mol.build(r, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.gate.proj.weight.copy_(
            torch.randn(model.gate.proj.weight.shape, generator=torch.Generator().manual_seed(2))
        )
        out = model(IDS, labels=IDS)
    gate = out.trace.slots[-1]
    assert gate.slot == -1 and gate.experts == ["a", "b"]
    g = gate.probs  # [B, T, 2]
    p = torch.stack([reference_logp(folders[k], IDS).exp() for k in ("l", "g")], -2)  # [B, T, 2, V]
    target = IDS[:, 1:]
    mixed = (g[:, :-1].unsqueeze(-1) * p[:, :-1]).sum(-2)  # [B, T-1, V]
    by_hand = -torch.log(mixed.gather(-1, target.unsqueeze(-1))).mean()
    assert abs(out.loss.item() - by_hand.item()) <= 1e-5


def test_lanes_keep_their_caches_through_generate(tiny):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    r = lanes_recipe(
        models,
        {"a": {"base": "l"}, "b": {"base": "g", "slots": ["g:0", "g:2"]}},
        [{"from": "a", "to": "b", "after": [2, 0]}],
    )
    model = mol.build(r, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.gate.proj.weight.copy_(
            torch.randn(model.gate.proj.weight.shape, generator=torch.Generator().manual_seed(3))
        )
        model.stitches[0].gate.fill_(0.3)
        ids = IDS[:, :6]
        got = model.generate(ids, max_new_tokens=6, eos_token_id=[])
        seq = greedy_by_full_forward(model, ids, 6)
    assert got.tolist() == seq.tolist()


def test_a_per_sequence_gate_runs_only_the_chosen_lane_after_the_prompt(tiny):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    model = mol.build(
        lanes_recipe(models, {"a": {"base": "l"}, "b": {"base": "g"}}, mixture="sequence"),
        device="cpu",
        dtype=torch.float32,
    )
    force_lane(model, 1)
    calls = {"a": 0, "b": 0}
    for name, lane in model.lanes.items():
        lane.slots[0].register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    out = model.generate(IDS[:, :5], max_new_tokens=4, eos_token_id=[], return_trace=True)
    assert calls == {"a": 1, "b": 4}  # the prompt runs both lanes; each fed-back token only the chosen one
    assert out.trace.slots[-1].router == "sequence"
    with torch.no_grad():  # and the tokens are lane b's own greedy continuation
        seq = IDS[:, :5]
        ref = AutoModelForCausalLM.from_pretrained(models["g"], dtype=torch.float32).eval()
        for _ in range(4):
            seq = torch.cat([seq, ref(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.sequences.tolist() == seq.tolist()


def test_a_lanes_recipe_round_trips_saves_and_exports(tiny, tmp_path):
    register_auto_classes()
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48)), "n": str(tiny("gpt_neox", width=32))}
    r = lanes_recipe(
        models,
        {"a": {"base": "l", "slots": ["l:0", {"experts": ["l:1", "n:1"]}, "l:2", "l:3"]}, "b": {"base": "g"}},
        [{"from": "b", "to": "a", "after": [0, 1]}],
    )
    assert mol.Recipe.from_yaml(r.to_yaml()) == r
    model = mol.build(r, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        want = model(IDS).logits
    assert_round_trips(model, r, tmp_path, IDS, want)


def test_the_plan_counts_lanes_and_refuses_what_cannot_run(tiny, tmp_path):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    p = mol.plan(lanes_recipe(models, {"a": {"base": "l"}, "b": {"base": "g"}}))
    assert set(p.lanes) == {"a", "b"} and p.cache_layers == 8
    assert p.gate_parameters() == (64 + 48 + 1) * 2
    with pytest.raises(RecipeError, match="has 4 slots"):
        mol.plan(
            lanes_recipe(
                models, {"a": {"base": "l"}, "b": {"base": "g"}}, [{"from": "a", "to": "b", "after": [4, 0]}]
            )
        )
    with pytest.raises(RecipeError, match="in a circle"):
        mol.plan(
            lanes_recipe(
                models,
                {"a": {"base": "l"}, "b": {"base": "g"}},
                [{"from": "a", "to": "b", "after": [2, 0]}, {"from": "b", "to": "a", "after": [2, 0]}],
            )
        )
    with pytest.raises(RecipeError, match="remove the top-level 'slots'"):
        mol.Recipe.from_dict({"name": "x", "models": models, "slots": ["l:0"], "lanes": {"a": "l", "b": "g"}})
    with pytest.raises(RecipeError, match="is not a lane"):
        lanes_recipe(
            models, {"a": {"base": "l"}, "b": {"base": "g"}}, [{"from": "c", "to": "a", "after": [0, 0]}]
        )
