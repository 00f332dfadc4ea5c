"""Bad input is refused by the plan, with a clear message, before any weights are read."""

import json
import shutil

import pytest

import mol
from mol.errors import (
    CheckpointError,
    IncompatibleModelsError,
    ModelNotFoundError,
    RecipeError,
    UnsupportedArchitectureError,
)


def recipe(models, slots, base=None):
    return mol.Recipe.from_dict(
        {"name": "t", "base": base or next(iter(models)), "models": models, "slots": slots}
    )


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        mol.plan(recipe({"a": str(tmp_path / "nope")}, ["a:0"]))


def test_uncached_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as info:
        mol.plan(recipe({"a": "nobody-here/no-such-model"}, ["a:0"]))
    msg = str(info.value)
    assert "offline" in msg and "local folder" in msg


def test_layer_out_of_range(tiny):
    with pytest.raises(RecipeError, match=r"out of range.*4 layers"):
        mol.plan(recipe({"a": str(tiny("llama"))}, ["a:4"]))


def test_unsupported_architecture_lists_families(tiny, tmp_path):
    folder = copy_model(tiny("llama"), tmp_path / "weird")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as info:
        mol.plan(recipe({"a": str(folder)}, ["a:0"]))
    for fam in ("llama", "gpt2", "gpt_neox", "opt", "phi"):
        assert fam in str(info.value)


def test_different_tokenizers_are_refused_naming_both(tiny, tmp_path):
    other = copy_model(tiny("gpt2"), tmp_path / "other-tok")
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(IncompatibleModelsError) as info:
        mol.plan(recipe({"base": str(tiny("llama")), "odd": str(other)}, ["base:0", "odd:1"]))
    assert "'base'" in str(info.value) and "'odd'" in str(info.value)


def test_truncated_safetensors(tiny, tmp_path):
    folder = copy_model(tiny("llama"), tmp_path / "trunc")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        mol.plan(recipe({"a": str(folder)}, ["a:0"]))


def test_garbage_safetensors(tiny, tmp_path):
    folder = copy_model(tiny("llama"), tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        mol.plan(recipe({"a": str(folder)}, ["a:0"]))


def test_config_that_lies_about_its_width(tiny, tmp_path):
    folder = copy_model(tiny("llama"), tmp_path / "liar")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="width 128"):
        mol.plan(recipe({"a": str(folder)}, ["a:0"]))


def test_pickle_only_checkpoint_is_refused(tiny, tmp_path):
    folder = copy_model(tiny("llama"), tmp_path / "pickle")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        mol.plan(recipe({"a": str(folder)}, ["a:0"]))


def test_missing_tokenizer_files_fail_clearly_when_running(tiny, tmp_path):
    folder = copy_model(tiny("llama"), tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    model = mol.build(recipe({"a": str(folder)}, ["a:0"]), device="cpu")
    assert model.tokenizer is None
    with pytest.raises(mol.MolError, match="tokenizer"):
        mol.calibrate(model, "some text")


def test_relative_paths_resolve_against_the_recipe_file(tiny, tmp_path):
    models = tmp_path / "pack" / "models"
    shutil.copytree(tiny("llama"), models / "tiny")
    rfile = tmp_path / "pack" / "recipes" / "r.yaml"
    rfile.parent.mkdir(parents=True)
    rfile.write_text("name: rel\nmodels: {a: ../models/tiny}\nslots: [a:0-1]\n")
    p = mol.plan(mol.Recipe.from_file(rfile))
    assert p.base.folder == (models / "tiny").resolve()


def test_pickle_checkpoint_loads_when_the_user_opts_in(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = copy_model(tiny("llama"), tmp_path / "pickle-ok")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    r = recipe({"a": str(folder)}, ["a:0-3"])
    model = mol.build(r, device="cpu", policy=mol.AccessPolicy(allow_bin=True))
    ref = mol.build(recipe({"a": str(tiny("llama"))}, ["a:0-3"]), device="cpu")
    ids = torch.randint(1, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_the_cli_opts_in_to_pickles_with_allow_bin(tiny, tmp_path, capsys):
    """`--allow-bin` is the CLI's way to the policy's allow_bin; without it a .bin-only folder is refused."""
    import torch
    from safetensors.torch import load_file

    from mol.cli import main

    folder = copy_model(tiny("llama"), tmp_path / "pickle-cli")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    rfile = tmp_path / "r.yaml"
    rfile.write_text(f"name: p\nmodels: {{a: {json.dumps(str(folder))}}}\nslots: [a:0]\n")
    assert main(["plan", str(rfile)]) == 2 and "--allow-bin" in capsys.readouterr().err
    assert main(["plan", "--allow-bin", str(rfile)]) == 0


def test_the_plan_records_each_layers_sliding_window(tiny):
    p = mol.plan(recipe({"a": str(tiny("mistral", sliding_window=64))}, ["a:0"]))
    assert [e.window for s in p.slots for e in s.experts] == [64] and not p.warnings
    assert [
        e.window for s in mol.plan(recipe({"a": str(tiny("llama"))}, ["a:0"])).slots for e in s.experts
    ] == [None]
