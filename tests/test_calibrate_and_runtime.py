"""Least-squares calibration of cross-width adapters, and the MoLRuntime quick start."""

import torch

import mol
from tests.tiny_models import CORPUS


def test_calibration_fits_better_than_truncated_identity(tiny):
    a, b = tiny("llama", width=64), tiny("gpt2", width=96)
    recipe = mol.Recipe.from_dict(
        {
            "name": "c",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": ["a:0", "b:1", {"experts": ["a:1", "b:2"]}, "a:2"],
        }
    )
    model = mol.build(recipe, device="cpu")
    ids = model.tokenizer(CORPUS[:400], return_tensors="pt")["input_ids"]
    before = model(ids, labels=ids).loss.item()
    report = mol.calibrate(model, CORPUS, max_tokens=600)
    assert set(report) == {"slot 1 b:1", "slot 2 b:2"}
    # The fitted map into the block's stream explains it better than the truncated identity did.
    assert all(err < 0.9 for err in report.values()), report
    after = model(ids, labels=ids).loss.item()
    assert after == after and after < before + 1.0  # finite, not broken by the fit


def test_calibration_is_a_no_op_without_foreign_experts(tiny):
    model = mol.build(
        mol.Recipe.from_dict({"name": "i", "models": {"a": str(tiny("llama"))}, "slots": ["a:0-3"]}),
        device="cpu",
    )
    assert mol.calibrate(model, CORPUS) == {}


def test_seed_quick_start(tiny):
    from mol import LinearAdapter, MoLRuntime, SimpleRouter

    assert LinearAdapter and SimpleRouter
    runtime = MoLRuntime(
        models=[str(tiny("llama", layers=4)), str(tiny("gpt2", width=96, layers=6))],
        adapter_type="linear",
        router_type="simple",
    )
    runtime.load_models()
    ids = torch.randint(1, 380, (2, 9))
    out = runtime.forward(ids, torch.ones_like(ids))
    assert out.logits.shape == (2, 9, 384)
    slots = runtime.recipe.slots
    assert len(slots) == 4
    # layer i of the base with layer round(i * 6 / 4) of the second model
    assert [str(s.experts[1]) for s in slots] == ["m1:0", "m1:2", "m1:3", "m1:4"]
    assert all(s.router.type == "token" for s in slots)
    assert len(out.trace.slots) == 4
    generated = runtime.generate(ids, max_new_tokens=3, eos_token_id=[], return_trace=True)
    assert generated.sequences.shape == (2, 12) and len(generated.trace.slots) == 4
