"""Training adapters and routers on tiny real checkpoints: the loss goes down, frozen blocks stay bit-identical,
saved weights reload to the same logits, a fixed seed (and a resumed run) gives the same weights."""

from __future__ import annotations

import json

import pytest
import torch

import mol
from mol.data import load_domains, tokenize_domains
from mol.errors import CheckpointError, DataError
from mol.evaluation import score
from mol.network.routers import load_balancing_loss
from mol.training import TrainConfig, companion_paths, lr_factor, train
from tests.host_reads import HostReads

PROSE = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings. " * 30
)
CODE = (
    "def main(argv):\n    return sorted(argv, key=len)\nimport os\nfor line in open(path):\n    print(line)\n"
    * 30
)
FAST = dict(seq_len=32, batch_size=4, warmup=2, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "prose.txt").write_text(PROSE)
    (d / "code").mkdir()
    (d / "code" / "a.py").write_text(CODE)
    (d / "code" / "notes.bin").write_bytes(b"\x00\x01 ignored: not a text extension")
    return [f"prose={d / 'prose.txt'}", f"code={d / 'code'}"]


@pytest.fixture
def recipe(tiny):
    a, b = tiny("llama"), tiny("gpt_neox", width=48)
    return mol.Recipe.from_dict(
        {
            "name": "tiny-fusion",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": [
                "a:0",
                {"experts": ["a:1", "b:1"]},
                {"experts": ["a:2", "b:2"], "router": "pooled"},
                "a:3",
            ],
        }
    )


def config(**kw) -> TrainConfig:
    base = {k: v for k, v in FAST.items() if k != "progress"}
    return TrainConfig(**{"steps": 6, "device": "cpu", **base, **kw})


def frozen_state(model) -> dict[str, torch.Tensor]:
    trainable = set(model.trainable_state_dict())
    return {k: v.clone() for k, v in model.state_dict().items() if k not in trainable}


def test_training_lowers_the_loss_and_leaves_source_blocks_bit_identical(recipe, data):
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data))
    before_loss = sum(score(model, t, seq_len=64).loss for t in tokens.values())
    before_frozen = frozen_state(model)
    before_trainable = {k: v.clone() for k, v in model.trainable_state_dict().items()}

    reported = []
    result = train(model, tokens, config(steps=15, lr=1e-2), progress=False, on_step=reported.append)

    after_loss = sum(score(model, t, seq_len=64).loss for t in tokens.values())
    assert after_loss < before_loss - 0.5, (before_loss, after_loss)
    after_frozen = frozen_state(model)
    assert after_frozen.keys() == before_frozen.keys() and len(after_frozen) > 0
    assert all(torch.equal(before_frozen[k], after_frozen[k]) for k in before_frozen)
    changed = [k for k, v in model.trainable_state_dict().items() if not torch.equal(v, before_trainable[k])]
    assert any(".adapter." in k for k in changed) and any(".router." in k for k in changed)
    assert len(result.curve) == 15 and result.metrics["steps"] == 15
    assert reported == result.curve and [p["step"] for p in reported] == list(
        range(1, 16)
    )  # live, step by step
    assert model(tokens["prose"].ids[None, :8]).trace is not None  # a plain forward still traces
    assert model(tokens["prose"].ids[None, :8], trace=False).trace is None  # as training calls it


def test_saved_weights_reload_to_the_same_logits(recipe, data, tmp_path):
    out = tmp_path / "run.safetensors"
    result = train(recipe, data, config(router_init="random"), out=out, progress=False)
    weights, run_json, optim = companion_paths(out)
    assert weights.is_file() and optim.is_file()
    run = json.loads(run_json.read_text())
    assert run["step"] == 6 and len(run["curve"]) == 6 and run["config"]["seq_len"] == 32
    assert set(run["data"]) == {"prose", "code"} and run["data"]["code"]["tokens"] > 0

    ids = torch.randint(1, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = result.model(ids).logits
        reloaded = mol.build(recipe, device="cpu", dtype=torch.float32, weights=out)(ids).logits
        fresh = mol.build(recipe, device="cpu", dtype=torch.float32)(ids).logits
    assert torch.equal(trained, reloaded)
    assert not torch.allclose(trained, fresh)


def test_fixed_seed_gives_the_same_weights_and_resume_equals_one_run(recipe, data, tmp_path):
    one = train(recipe, data, config(steps=6), out=tmp_path / "one.safetensors", progress=False).model
    again = train(recipe, data, config(steps=6), progress=False).model
    train(recipe, data, config(steps=3), out=tmp_path / "two.safetensors", progress=False)
    two = train(recipe, data, config(steps=6), out=tmp_path / "two.safetensors", resume=True, progress=False)
    a, b, c = one.trainable_state_dict(), again.trainable_state_dict(), two.model.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], c[k], atol=1e-6, rtol=0) for k in a)
    run = json.loads(companion_paths(tmp_path / "two.safetensors")[1].read_text())
    assert run["step"] == 6 and [p["step"] for p in run["curve"]] == [1, 2, 3, 4, 5, 6]
    other = train(recipe, data, config(steps=6, seed=1), progress=False).model.trainable_state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_resume_without_a_saved_run_state_is_a_clear_error(recipe, data, tmp_path):
    out = tmp_path / "w.safetensors"
    train(recipe, data, config(steps=2), out=out, progress=False)
    companion_paths(out)[2].unlink()
    with pytest.raises(CheckpointError, match="optim"):
        train(recipe, data, config(steps=4), out=out, resume=True, progress=False)


def test_load_balancing_loss_known_values():
    n, tokens = 4, 8
    uniform = torch.full((1, tokens, n), 1.0 / n)
    even = torch.arange(tokens).remainder(n).view(1, tokens, 1)
    assert load_balancing_loss(uniform, even).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(1, tokens, n)
    collapsed[..., 0] = 1.0
    assert load_balancing_loss(
        collapsed, torch.zeros(1, tokens, 1, dtype=torch.long)
    ).item() == pytest.approx(n)


def test_load_balancing_loss_counts_only_the_real_tokens():
    """Padding neither counts as a choice nor as gate probability: the loss over a masked batch is the loss over
    its real tokens alone (a hand computation of N * sum_i f_i * P_i), and nothing real gives 0."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 3, generator=g).softmax(-1).requires_grad_()
    chosen = probs.detach().topk(2, dim=-1).indices
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    keep = mask.reshape(-1).bool()
    p, c = probs.reshape(-1, 3)[keep], chosen.reshape(-1, 2)[keep]
    f = torch.stack([(c == i).sum() for i in range(3)]).float() / c.numel()
    want = 3 * (f * p.mean(0)).sum()
    got = load_balancing_loss(probs, chosen, mask)
    torch.testing.assert_close(got, want)
    got.backward()
    # padding gets no gradient, real tokens do
    assert probs.grad[0, 3:].abs().sum() == 0
    assert probs.grad[0, :3].abs().sum() > 0
    assert load_balancing_loss(probs, chosen, torch.zeros_like(mask)).item() == 0.0
    with HostReads() as reads:  # a selection's size would be a host read: a stall per routed slot per step
        load_balancing_loss(probs, chosen, mask)
    assert not reads.ops, reads.ops


def test_closed_form_router_follows_the_domain_labels(recipe, data):
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data))
    experts = {"prose": "a", "code": "b"}
    from mol.router_init import init_routers

    report = init_routers(model, "ridge", tokens, experts, sample_tokens=512, seq_len=32)
    assert set(report) == {"slot 1", "slot 2"}
    assert report["slot 1"] > 0.9  # token router: two very different texts
    for name, t in tokens.items():
        res = score(model, t, seq_len=64, label_experts=experts)
        assert res.agreement["1"] > 0.9, (name, res.agreement)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(55, c) == pytest.approx(0.55)
    assert lr_factor(100, c) == pytest.approx(0.1)
    assert all(lr_factor(s, c) >= lr_factor(s + 1, c) for s in range(10, 100))


def test_bad_inputs_are_typed_errors(recipe, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(recipe, [f"prose={tmp_path / 'missing.txt'}"], config(), progress=False)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        train(recipe, [f"prose={tmp_path / 'empty.txt'}"], config(), progress=False)
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    with pytest.raises(DataError, match="seq-len"):
        train(recipe, [f"code={tmp_path / 'short.txt'}"], config(), progress=False)
    with pytest.raises(DataError, match="router_init"):
        TrainConfig(router_init="magic")


def test_mixed_rows_interleave_domains_and_batches_depend_only_on_seed_and_step(recipe, data):
    from mol.data import TrainBatches

    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data))
    batches = TrainBatches(tokens, seq_len=48, batch_size=6, seed=3, mixed_share=1.0, chunk=16)
    ids, labels = batches.batch(5)
    assert ids.shape == labels.shape == (6, 48)
    assert all(len(set(row.tolist())) == 2 for row in labels)  # every row holds both domains
    again, _ = TrainBatches(tokens, seq_len=48, batch_size=6, seed=3, mixed_share=1.0, chunk=16).batch(5)
    assert torch.equal(ids, again)
    pure = TrainBatches(tokens, seq_len=48, batch_size=6, seed=3).batch(5)[1]
    assert all(len(set(row.tolist())) == 1 for row in pure)


def test_zero_out_adapters_start_as_the_base_path_and_keep_leaves_routers(recipe, data):
    from mol.training import initialise

    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data))
    plain = mol.build(
        mol.Recipe.from_dict(
            {
                "name": "a",
                "base": "a",
                "models": {"a": recipe.models["a"]},
                "slots": ["a:0", "a:1", "a:2", "a:3"],
            }
        ),
        device="cpu",
        dtype=torch.float32,
    )
    report = initialise(
        model, tokens, config(adapter_init="lstsq-zero-out", router_init="ridge"), {"prose": "a", "code": "b"}
    )
    assert report["adapter_fit"] and set(report["router_fit"]) == {"slot 1", "slot 2"}
    with torch.no_grad():  # route everything to the foreign (silent) blocks
        for slot in model.routed_slots:
            slot.router.proj.weight.zero_()
            slot.router.proj.bias.copy_(torch.tensor([0.0, 10.0]))
    # The model is then the base's own layers without slots 1 and 2.
    skip = mol.build(
        mol.Recipe.from_dict(
            {"name": "a", "base": "a", "models": {"a": recipe.models["a"]}, "slots": ["a:0", "a:3"]}
        ),
        device="cpu",
        dtype=torch.float32,
    )
    ids = torch.randint(1, 380, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, skip(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)
    routers = {k: v.clone() for k, v in model.trainable_state_dict().items() if ".router." in k}
    initialise(model, tokens, config(router_init="keep"))
    assert all(torch.equal(v, model.trainable_state_dict()[k]) for k, v in routers.items())


def test_distillation_pulls_the_fused_model_towards_the_label_teacher(recipe, data):
    from mol.evaluation import source_model

    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data))
    teacher = source_model(model, "b")
    ids = tokens["code"].ids[:64].view(1, -1)

    def gap() -> float:
        with torch.no_grad():
            p = teacher(ids).logits.log_softmax(-1)
            q = model(ids).logits.log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    before = gap()
    result = train(
        model,
        tokens,
        config(steps=12, lr=1e-2, distill_weight=1.0),
        progress=False,
        domain_experts={"prose": "b", "code": "b"},
    )
    assert gap() < before
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]


def test_compiled_training_gives_the_eager_weights_and_leaves_the_model_uncompiled(recipe, data, monkeypatch):
    import functools

    import mol.compiling

    # The fallback compiler backend: the same graph capture, no C++ compiler needed on the test machine.
    monkeypatch.setattr(
        mol.compiling,
        "compile_network",
        functools.partial(mol.compiling.compile_network, backend="aot_eager"),
    )
    eager = mol.build(recipe, device="cpu", dtype=torch.float32)
    compiled = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(eager.tokenizer, load_domains(data))
    train(eager, tokens, config(steps=4), progress=False)
    train(compiled, tokens, config(steps=4, compile=True), progress=False)
    a, b = eager.trainable_state_dict(), compiled.trainable_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)  # float reassociation in the graph
    assert compiled.compiled_step_logits is None  # generation runs the plain step again


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", float("nan")),
        ("lr", 0.0),
        ("router_lr", float("inf")),
        ("router_lr", -1e-3),
        ("mixed_share", 1.5),
        ("min_lr_ratio", float("nan")),
        ("grad_clip", -1.0),
        ("aux_loss_weight", float("nan")),
        ("distill_weight", "0.1"),
    ],
)
def test_a_config_no_run_could_use_is_refused_with_its_field_named(field, value):
    with pytest.raises(DataError, match=f"^{field} must be a finite number"):
        TrainConfig(**{field: value})


def test_should_stop_ends_the_run_after_that_step_and_saves_it(recipe, data, tmp_path):
    asked = []
    result = train(
        recipe,
        data,
        config(steps=50),
        out=tmp_path / "w.safetensors",
        progress=False,
        should_stop=lambda: asked.append(1) or len(asked) >= 3,
    )
    assert result.steps == 3 and len(result.curve) == 3
    assert result.weights_path is not None and result.weights_path.is_file()
    rebuilt = mol.build(recipe, device="cpu", dtype=torch.float32, weights=result.weights_path)
    assert all(
        torch.equal(rebuilt.trainable_state_dict()[k], v)
        for k, v in result.model.trainable_state_dict().items()
    )


def test_lanes_train_their_gate_and_stitches_from_the_closed_form_start(tiny, data):
    models = {"a": str(tiny("llama")), "b": str(tiny("gpt_neox", width=48))}
    r = mol.Recipe.from_dict(
        {
            "name": "lanes",
            "models": models,
            "lanes": {"x": {"base": "a"}, "y": {"base": "b"}},
            "stitches": [{"from": "y", "to": "x", "after": [1, 1]}],
            "mixture": "token",  # the gate read from the lanes' states, fitted by ridge
        }
    )
    result = train(r, data, config(steps=4, router_init="ridge"), progress=False)
    model = result.model
    assert model.gate.proj.weight.abs().sum() > 0  # fitted in closed form before the first step
    assert model.stitches[0].gate.item() != 0.0  # the stitch learnt to open
    assert set(model.trainable_state_dict()) == {
        n for n in model.state_dict() if n.startswith(("gate.", "stitches."))
    }
