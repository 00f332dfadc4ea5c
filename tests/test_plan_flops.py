"""The plan's forward FLOPs per token (mol.costs): hand computations on tiny checkpoints, and torch's own
FlopCounterMode on real forwards as the reference."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import mol
from mol.costs import source_flops

# The llama tiny model: width 64, 4 heads of 16 (2 kv heads), gated MLP of 128, vocabulary 384.
W, KV, FF, V = 64, 32, 128, 384
LLAMA_MLP = 2 * 3 * W * FF
LLAMA_REST = 2 * (W * W + 2 * W * KV + W * W)  # q, k, v, o


def scores(ctx, d_attn=W):
    return 4 * ctx * d_attn


def recipe(models, slots, base=None, **extra):
    return mol.Recipe.from_dict(
        {"name": "r", "models": models, "base": base or next(iter(models)), "slots": slots, **extra}
    )


def lanes(models, lanes_, mixture="token", stitches=()):
    return mol.Recipe.from_dict(
        {"name": "l", "models": models, "lanes": lanes_, "mixture": mixture, "stitches": list(stitches)}
    )


def test_a_source_alone_by_hand(tiny):
    p = mol.plan(recipe({"l": str(tiny("llama"))}, [{"experts": [f"l:{i}"]} for i in range(4)]))
    f = p.flops_per_token(1024)
    want = 4 * (LLAMA_REST + LLAMA_MLP + scores(1024)) + 2 * V * W
    assert f["sources"]["l"]["flops"] == want
    assert f["prompt"] == f["generated"] == want  # the identity recipe is its source
    assert f["sources"]["l"]["ratio"] == 1.0
    assert f["context_tokens"] == 1024
    assert "1.00x" in p.summary()
    assert json.loads(json.dumps(p.to_dict()))["flops_per_token"]["sources"]["l"]["ratio"] == 1.0


def test_a_top1_token_routed_slot_runs_every_attention_and_one_mlp(tiny):
    folder = str(tiny("llama"))
    slots = [{"experts": ["l:0"]}, {"experts": ["l:1", "l:2"], "router": {"type": "token", "top_k": 1}}]
    f = mol.plan(recipe({"l": folder}, slots)).flops_per_token(512)
    layer = LLAMA_REST + LLAMA_MLP + scores(512)
    routed = 2 * (LLAMA_REST + scores(512)) + LLAMA_MLP + 2 * W * 2  # + the router
    assert f["prompt"] == layer + routed + 2 * V * W
    assert f["parts"]["routers"] == 2 * W * 2
    top2 = [{"experts": ["l:0"]}, {"experts": ["l:1", "l:2"], "router": {"type": "token", "top_k": 2}}]
    assert mol.plan(recipe({"l": folder}, top2)).flops_per_token(512)["prompt"] == f["prompt"] + LLAMA_MLP


def test_a_pooled_slot_runs_one_expert(tiny):
    slots = [{"experts": ["l:0", "l:1"], "router": {"type": "pooled"}}]
    f = mol.plan(recipe({"l": str(tiny("llama"))}, slots)).flops_per_token(256)
    assert f["prompt"] == LLAMA_REST + LLAMA_MLP + scores(256) + 2 * W * 2 + 2 * V * W


def test_a_foreign_block_adds_its_adapter(tiny):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    f = mol.plan(recipe(models, [{"experts": ["l:0"]}, {"experts": ["g:1"]}])).flops_per_token(128)
    gpt2_layer = 2 * (48 * 3 * 48 + 48 * 48 + 2 * 48 * 4 * 48) + scores(128, 48)  # c_attn, c_proj, MLP 4x
    assert f["parts"]["adapters"] == 2 * 2 * W * 48
    assert f["prompt"] == LLAMA_REST + LLAMA_MLP + scores(128) + gpt2_layer + 2 * 2 * W * 48 + 2 * V * W


def test_lanes_run_every_lane_and_the_gate(tiny):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    plan = mol.plan(lanes(models, {"a": {"base": "l"}, "b": {"base": "g"}}))
    f = plan.flops_per_token()
    alone = {a: s["flops"] for a, s in f["sources"].items()}
    gate = 2 * (W + 48) * 2
    assert f["prompt"] == f["generated"] == alone["l"] + alone["g"] + gate
    assert f["parts"]["gate"] == gate
    assert "generated_by_lane" not in f


def test_a_sequence_mixture_generates_with_the_chosen_lane_and_its_stitch_sources(tiny):
    models = {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))}
    stitch = {"from": "b", "to": "a", "after": [1, 2], "type": "lowrank", "rank": 8}
    plan = mol.plan(lanes(models, {"a": {"base": "l"}, "b": {"base": "g"}}, {"type": "sequence"}, [stitch]))
    f = plan.flops_per_token()
    alone = {a: s["flops"] for a, s in f["sources"].items()}
    st = 2 * 8 * (48 + W)
    assert f["prompt"] == alone["l"] + alone["g"] + st + 2 * (W + 48) * 2
    # lane a reads lane b through the stitch, so choosing a runs both; choosing b runs b alone
    assert f["generated_by_lane"] == {"a": alone["l"] + alone["g"] + st, "b": alone["g"]}
    assert f["generated"] == alone["l"] + alone["g"] + st
    assert "per generated token" in plan.summary()


def test_a_sliding_window_caps_the_attention_term(tiny):
    folder = tiny("mistral", sliding_window=64)
    f = mol.plan(recipe({"m": str(folder)}, [{"experts": ["m:0"]}])).flops_per_token(1024)
    assert f["parts"]["attention"] == scores(64)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "phi"])
def test_a_source_matches_torchs_flop_counter(tiny, family):
    """FlopCounterMode over a real forward of T tokens counts every matrix product and the full T x T
    attention, which is the plan's per-token figure at context T, times T."""
    folder = tiny(family, width=48)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    )
    t = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(1, 380, (1, t)))
    src = mol.plan(recipe({"s": str(folder)}, [{"experts": ["s:0"]}])).sources["s"]
    assert source_flops(src, t) * t == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_a_routed_fused_model_matches_torchs_flop_counter(tiny):
    """A built top-1 routed slot under FlopCounterMode: both candidates' attention, one MLP per token."""
    models = {"l": str(tiny("llama"))}
    slots = [{"experts": ["l:0"]}, {"experts": ["l:1", "l:2"], "router": {"type": "token", "top_k": 1}}]
    r = recipe(models, slots)
    model = mol.build(r, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.slots[1].router.proj.weight.normal_(0, 1.0)  # tokens split between the experts
    t = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(1, 380, (1, t)), trace=False)
    # the matrix products alone: the fused model runs SDPA, which the counter may or may not count on a CPU
    products = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    f = mol.plan(r).flops_per_token(t)
    assert (f["prompt"] - f["parts"]["attention"]) * t == pytest.approx(products, rel=0.02)
