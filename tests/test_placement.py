"""Placement over devices: the plan decides each slot's device; a placed or offloaded model gives the logits of
the model on one device. CPU-only tests use the CPU as every device (offload hooks included); the multi-GPU
checks run where two CUDA devices are visible."""

import pytest
import torch

import mol
from mol.placement import Placement, plan_placement, slot_sizes
from mol.planning import plan as make_plan

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def recipe(tiny):
    return mol.Recipe.from_dict(
        {
            "name": "placed",
            "base": "l",
            "models": {"l": str(tiny("llama", width=64)), "g": str(tiny("gpt2", width=96))},
            "slots": [
                "l:0",
                {"experts": ["l:1", "g:1"]},
                "g:2",
                {"experts": ["l:2", "g:0"], "router": "pooled"},
                "l:3",
            ],
        }
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def test_slot_sizes_come_from_the_plan(tiny):
    p = make_plan(recipe(tiny))
    sizes = slot_sizes(p, torch.float32)
    assert len(sizes) == 5 and all(s > 0 for s in sizes)
    assert sizes[1] > sizes[0]  # two experts and an adapter
    half = slot_sizes(p, torch.bfloat16)
    assert sum(half) < sum(sizes)


def test_dict_map_ranges_and_errors(tiny):
    p = make_plan(recipe(tiny))
    pl = plan_placement(p, {"main": "cpu", "slots.1-3": "cpu"}, None, torch.float32)
    assert pl.main == torch.device("cpu") and pl.offload == set()  # everything on the CPU: nothing to offload
    with pytest.raises(mol.errors.RecipeError):
        plan_placement(p, {"slots.9": "cpu"}, None, torch.float32)
    with pytest.raises(mol.errors.RecipeError):
        plan_placement(p, {"layers.1": "cpu"}, None, torch.float32)
    with pytest.raises(mol.errors.RecipeError):
        plan_placement(p, "everywhere", None, torch.float32)


def test_balanced_map_spreads_slots_in_order(tiny, monkeypatch):
    p = make_plan(recipe(tiny))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pl = plan_placement(p, "auto", {0: "1GiB", 1: "1GiB"}, torch.float32)
    devices = [d.index for d in pl.slots]
    assert devices == sorted(devices) and set(devices) == {0, 1}
    assert pl.main == torch.device("cuda", 0) and not pl.offload
    total = sum(slot_sizes(p, torch.float32))
    # the first GPU is nearly full: the rest is offloaded to host memory
    pl = plan_placement(p, "sequential", {0: int(total * 0.6), "cpu": "1GiB"}, torch.float32)
    assert pl.offload and all(pl.slots[i].type == "cpu" for i in pl.offload)
    with pytest.raises(mol.errors.ResourceError):
        plan_placement(p, "sequential", {0: int(total * 0.6)}, torch.float32)


def test_device_map_build_gives_the_same_logits(tiny):
    ids = torch.randint(1, 380, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = mol.build(recipe(tiny), device="cpu")
    placed = mol.build(recipe(tiny), device_map={"main": "cpu", "slots.2-4": "cpu"})
    assert placed.placement.device_map()["slots.3"] == "cpu"
    assert torch.equal(_logits(plain, ids), _logits(placed, ids))


def test_offloaded_slots_stream_their_weights(tiny):
    """accelerate's offload hooks on some slots (CPU as the execution device here): same logits and tokens."""
    ids = torch.randint(1, 380, (2, 8), generator=torch.Generator().manual_seed(2))
    plain = mol.build(recipe(tiny), device="cpu")
    model = mol.build(recipe(tiny), device="cpu")
    cpu = torch.device("cpu")
    Placement(main=cpu, slots=[cpu] * 5, offload={1, 2}).apply(model)
    assert model.slots[2].experts[0].layer.mlp.c_fc.weight.device.type == "meta"  # held by the hook
    assert torch.allclose(_logits(plain, ids), _logits(model, ids), atol=1e-5)
    a = plain.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert model.generate(ids, max_new_tokens=6, eos_token_id=[]).tolist() == a.tolist()


@two_gpus
def test_two_gpus_give_the_one_device_logits(tiny):
    ids = torch.randint(1, 380, (2, 10), generator=torch.Generator().manual_seed(3))
    one = mol.build(recipe(tiny), device="cuda:0", dtype=torch.float32)
    two = mol.build(recipe(tiny), device_map={"slots.0-1": 0, "slots.2-4": 1}, dtype=torch.float32)
    assert two.slots[3].experts[0].layer.mlp.up_proj.weight.device == torch.device("cuda", 1)
    assert torch.allclose(_logits(one, ids), _logits(two, ids), atol=1e-4)
    assert (
        two.generate(ids, max_new_tokens=8, eos_token_id=[]).tolist()
        == one.generate(ids, max_new_tokens=8, eos_token_id=[]).tolist()
    )
    off = mol.build(recipe(tiny), device_map={"slots.2-4": "cpu"}, dtype=torch.float32)
    assert off.placement.offload == {2, 3, 4}
    assert torch.allclose(_logits(one, ids), _logits(off, ids), atol=1e-4)
