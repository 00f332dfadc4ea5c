"""The evidence gate (`mixture: {type: evidence}`): each lane weighted by how well it predicted the recent tokens.
Checked against a hand computation from the sources' own distributions, through cached and padded generation, the
closed-form fit, save/reload and export."""

import math

import torch
from transformers import AutoModelForCausalLM

import mol
from mol.data import DomainTokens
from mol.export import register_auto_classes
from mol.router_init import init_routers
from tests.tiny_models import assert_round_trips, greedy_by_full_forward

IDS = torch.randint(1, 380, (2, 12), generator=torch.Generator().manual_seed(0))


def build(tiny, **extra):
    recipe = mol.Recipe.from_dict(
        {
            "name": "evidence",
            "models": {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))},
            "lanes": {"a": {"base": "l"}, "b": {"base": "g"}},
            "mixture": {"type": "evidence"},
            **extra,
        }
    )
    return mol.build(recipe, device="cpu", dtype=torch.float32), recipe


def sources_logp(tiny, ids):
    out = []
    for folder in (tiny("llama"), tiny("gpt2", width=48)):
        ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(ref(ids).logits.float().log_softmax(-1))
    return out


def test_the_mixture_is_bayes_rule_with_forgetting_by_hand(tiny):
    model, _ = build(tiny)
    with torch.no_grad():
        model.gate.prior.copy_(torch.tensor([0.3, -0.2]))
        model.gate.scale.fill_(0.7)
        got = model(IDS).logits
    decay = float(model.gate.decay.detach())
    lanes = sources_logp(tiny, IDS)
    for b in range(IDS.shape[0]):
        evidence = [0.0, 0.0]
        for t in range(IDS.shape[1]):
            if t > 0:  # the token read at t, as each lane predicted it at t - 1
                evidence = [decay * evidence[i] + float(lanes[i][b, t - 1, IDS[b, t]]) for i in range(2)]
            scores = torch.tensor([0.3 + 0.7 * evidence[0], -0.2 + 0.7 * evidence[1]])
            g = scores.log_softmax(-1)
            want = torch.logsumexp(torch.stack([g[0] + lanes[0][b, t], g[1] + lanes[1][b, t]]), 0)
            assert (got[b, t] - want).abs().max().item() <= 1e-4


def test_cached_and_padded_generation_equal_full_forwards(tiny):
    model, _ = build(tiny)
    ids, mask = IDS[:, :7].clone(), torch.ones(2, 7, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # row 1 left-padded
    with torch.no_grad():
        got = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
        seq = greedy_by_full_forward(model, ids, 6, mask)
        alone = model(ids[1:, 3:]).logits
        padded = model(ids, mask).logits[1:, 3:]
        # step by step with the cache: every step's distribution equals the full forward's at that position
        cache = model.new_cache()
        steps = [model(IDS[:, :5], cache=cache).logits[:, -1]]
        for t in range(5, 12):
            steps.append(model(IDS[:, t : t + 1], cache=cache).logits[:, -1])
        full = model(IDS).logits[:, 4:]
    assert got.tolist() == seq.tolist()
    assert (alone - padded).abs().max().item() <= 1e-5
    assert (torch.stack(steps, 1) - full).abs().max().item() <= 1e-4


def test_the_closed_form_fits_the_decay_and_falls_back_to_the_better_lane(tiny):
    model, _ = build(tiny)
    ids = torch.randint(1, 380, (1024,), generator=torch.Generator().manual_seed(3))
    tokens = {"text": DomainTokens("text", ids, torch.zeros(1024, dtype=torch.long), ["text"])}
    report = init_routers(model, "ridge", tokens, sample_tokens=1024, seq_len=128)
    assert {"gate: decay", "gate: scale"} <= set(report)
    best = min(report["gate: a alone"], report["gate: b alone"])
    # a Bayesian mixture costs at most log(lanes) over its best lane, whatever the text
    assert report["gate: fitted gate"] <= best + math.log(2) + 1e-6
    assert report["gate: fitted gate"] <= report["gate: uniform mixture"] + 1e-6
    assert math.isclose(float(model.gate.decay.detach()), report["gate: decay"], rel_tol=1e-5)


def test_an_evidence_recipe_trains_saves_and_exports(tiny, tmp_path):
    register_auto_classes()
    model, recipe = build(tiny)
    assert mol.Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert (
        mol.plan(recipe).gate_parameters()
        == 4
        == sum(p.numel() for p in model.trainable_parameters().values())
    )
    with torch.no_grad():
        model.gate.prior.copy_(torch.tensor([0.5, -0.5]))
        model.gate.decay_logit.fill_(1.0)
        want = model(IDS).logits
    assert_round_trips(model, recipe, tmp_path, IDS, want)
