"""`train_head`: the base's final norm and head (every lane's) train with the adapters and routers, are saved in
the run's weights file, reload with it and are exported in place of the source's. A head tied to the input
embedding is untied: the embedding never changes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mol
from mol.export import export
from mol.training import TrainConfig, train

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 30
IDS = torch.randint(1, 380, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prose.txt"
    path.write_text(TEXT)
    return [f"prose={path}"]


def config(**kw) -> TrainConfig:
    return TrainConfig(
        **{"steps": 6, "device": "cpu", "seq_len": 32, "batch_size": 4, "warmup": 0, "lr": 3e-3, **kw}
    )


def routed(folder) -> mol.Recipe:
    return mol.Recipe.from_dict(
        {
            "name": "routed",
            "base": "l",
            "models": {"l": str(folder)},
            "slots": ["l:0", {"experts": ["l:1", "l:2"], "router": {"type": "token", "top_k": 1}}, "l:3"],
        }
    )


def head_state(model) -> dict[str, torch.Tensor]:
    return {
        n: t.detach().clone()
        for n, t in model.state_dict().items()
        if n.split(".")[0] in ("head", "final_norm")
    }


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits


def test_without_the_flag_the_head_stays_the_sources(tiny, data):
    r = routed(tiny("llama"))
    before = head_state(mol.build(r, device="cpu", dtype=torch.float32))
    result = train(r, data, config(), progress=False)
    after = head_state(result.model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not any(k.startswith(("head.", "final_norm.")) for k in result.model.trainable_state_dict())


def test_the_head_trains_saves_reloads_and_exports(tiny, data, tmp_path):
    r = routed(tiny("llama"))
    before = head_state(mol.build(r, device="cpu", dtype=torch.float32))
    result = train(
        r, data, config(train_head=True, train_routers=False), out=tmp_path / "w.safetensors", progress=False
    )
    model = result.model
    after = head_state(model)
    assert all(not torch.equal(before[n], after[n]) for n in ("head.weight", "final_norm.weight"))
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]
    reloaded = mol.build(r, device="cpu", dtype=torch.float32, weights=result.weights_path)
    assert torch.equal(logits(reloaded), logits(model))
    exported = export(r, tmp_path / "out", weights=result.weights_path)
    assert exported.format == "mol"
    loaded = AutoModelForCausalLM.from_pretrained(str(exported.path)).eval()
    with torch.no_grad():
        assert (loaded(IDS).logits - logits(model)).abs().max().item() < 1e-5


def test_a_trained_head_exports_as_the_standard_architecture(tiny, data, tmp_path):
    folder = tiny("llama")
    r = mol.Recipe.from_dict(
        {"name": "stack", "base": "l", "models": {"l": str(folder)}, "slots": ["l:0", "l:1", "l:3"]}
    )
    result = train(r, data, config(steps=3, train_head=True), progress=False)
    exported = export(result.model, tmp_path / "out")
    assert exported.format == "standard"
    assert not (
        exported.path / "mergekit_config.yml"
    ).exists()  # a passthrough config would take the base's head
    loaded = AutoModelForCausalLM.from_pretrained(str(exported.path)).eval()
    with torch.no_grad():
        assert (loaded(IDS).logits - logits(result.model)).abs().max().item() < 1e-5


def test_a_tied_head_is_untied_and_the_embedding_stays(tiny, data, tmp_path):
    folder = tiny("llama", tie_word_embeddings=True)
    r = routed(folder)
    source = mol.build(r, device="cpu", dtype=torch.float32)
    assert source.head.weight is source.embed.weight
    embed = source.embed.weight.detach().clone()
    result = train(r, data, config(train_head=True), out=tmp_path / "w.safetensors", progress=False)
    model = result.model
    assert model.head.weight is not model.embed.weight
    assert torch.equal(model.embed.weight, embed)
    assert not torch.equal(model.head.weight, embed)
    reloaded = mol.build(r, device="cpu", dtype=torch.float32, weights=result.weights_path)
    assert torch.equal(reloaded.embed.weight, embed)
    assert torch.equal(logits(reloaded), logits(model))
    for out, fmt in (("mol", "mol"),):
        loaded = AutoModelForCausalLM.from_pretrained(
            str(export(model, tmp_path / out, format=fmt).path)
        ).eval()
        assert not loaded.config.tie_word_embeddings
        with torch.no_grad():
            assert (loaded(IDS).logits - logits(model)).abs().max().item() < 1e-5
    stack = mol.Recipe.from_dict(
        {"name": "tied", "base": "l", "models": {"l": str(folder)}, "slots": ["l:0", "l:2"]}
    )
    trained = train(stack, data, config(steps=2, train_head=True), progress=False).model
    loaded = AutoModelForCausalLM.from_pretrained(str(export(trained, tmp_path / "std").path)).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.get_input_embeddings().weight, embed)
    with torch.no_grad():
        assert (loaded(IDS).logits - logits(trained)).abs().max().item() < 1e-5


def test_every_lane_trains_its_head(tiny, data, tmp_path):
    models = {"l": str(tiny("llama")), "t": str(tiny("llama", width=48, tie_word_embeddings=True))}
    r = mol.Recipe.from_dict(
        {
            "name": "lanes",
            "models": models,
            "lanes": {"a": {"base": "l"}, "b": {"base": "t"}},
            "mixture": "token",
        }
    )
    before = mol.build(r, device="cpu", dtype=torch.float32)
    embed_b = before.lanes["b"].embed.weight.detach().clone()
    result = train(r, data, config(steps=3, train_head=True), out=tmp_path / "w.safetensors", progress=False)
    model = result.model
    for lane in ("a", "b"):
        assert not torch.equal(model.lanes[lane].head.weight, before.lanes[lane].head.weight)
    assert torch.equal(model.lanes["b"].embed.weight, embed_b)
    reloaded = mol.build(r, device="cpu", dtype=torch.float32, weights=result.weights_path)
    assert torch.equal(logits(reloaded), logits(model))
    loaded = AutoModelForCausalLM.from_pretrained(str(export(model, tmp_path / "out").path)).eval()
    with torch.no_grad():
        assert (loaded(IDS).logits - logits(model)).abs().max().item() < 1e-5


def test_a_weights_file_with_unknown_names_is_still_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    from mol.errors import CheckpointError

    r = routed(tiny("llama"))
    model = mol.build(r, device="cpu", dtype=torch.float32)
    model.train_head()
    state = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
    state["head.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected"):
        mol.build(r, device="cpu", dtype=torch.float32, weights=tmp_path / "bad.safetensors")
