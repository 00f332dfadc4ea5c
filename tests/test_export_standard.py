"""Standard export: a plain same-architecture stack becomes the source architecture itself. It reloads with
plain transformers and gives the fused runtime's logits; its tensors are exactly the mergekit passthrough
layout; the writing is atomic."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import mol
from mol.errors import RecipeError, StorageError
from mol.export import export

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "opt", "phi"]
IDS = torch.randint(1, 380, (2, 12), generator=torch.Generator().manual_seed(11))


def stacked(folder, name="stack"):
    # Repeated layers (1 and 2 twice), as frankenmerges do.
    return mol.Recipe.from_dict({"name": name, "models": {"m": str(folder)}, "slots": ["m:0-2", "m:1-3"]})


def reload(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_export_reloads_with_runtime_logits(tiny, tmp_path, family):
    recipe = stacked(tiny(family))
    result = export(recipe, tmp_path / "out")
    assert result.format == "standard" and result.layers == 6
    cfg = AutoConfig.from_pretrained(str(result.path))
    assert cfg.model_type == family and cfg.num_hidden_layers == 6
    loaded = reload(result.path)
    assert type(loaded).__module__.startswith("transformers.models.")
    runtime = mol.build(recipe, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        diff = (runtime(IDS).logits - loaded(IDS).logits).abs().max().item()
    assert diff <= 1e-5
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "mergekit_config.yml",
        "mol_recipe.yaml",
    ):
        assert (result.path / name).is_file(), name


def test_tensors_are_the_mergekit_passthrough_layout(tiny, tmp_path):
    """Layer i of the output is the i-th listed source layer, byte for byte; embeddings, norm and head are the
    base's, as mergekit's passthrough writes them for the equivalent slices config."""
    src = tiny("llama")
    result = export(stacked(src), tmp_path / "out")
    written = all_tensors(result.path)
    source = all_tensors(src)
    order = [0, 1, 2, 1, 2, 3]
    expected = {}
    for name, t in source.items():
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers.") :].split(".", 1)
            for i, src_layer in enumerate(order):
                if src_layer == int(layer):
                    expected[f"model.layers.{i}.{rest}"] = t
        else:
            expected[name] = t
    assert set(written) == set(expected)
    for name, t in expected.items():
        assert torch.equal(written[name], t), name
    mk = (result.path / "mergekit_config.yml").read_text()
    assert "layer_range: [0, 3]" in mk and "layer_range: [1, 4]" in mk and "merge_method: passthrough" in mk


def test_two_finetunes_of_one_architecture_export_standard(tiny, tmp_path):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    recipe = mol.Recipe.from_dict(
        {
            "name": "two",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": ["a:0", "b:1", "b:2", "a:3"],
        }
    )
    result = export(recipe, tmp_path / "out")
    assert result.format == "standard"
    runtime = mol.build(recipe, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert (runtime(IDS).logits - reload(result.path)(IDS).logits).abs().max().item() <= 1e-5
    with (
        safe_open(str(result.path / "model.safetensors"), "pt") as out,
        safe_open(str(b / "model.safetensors"), "pt") as src_b,
    ):
        assert torch.equal(
            out.get_tensor("model.layers.1.mlp.up_proj.weight"),
            src_b.get_tensor("model.layers.1.mlp.up_proj.weight"),
        )


def test_tokenizer_and_generation_config_come_with_the_export(tiny, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    src = tiny("gpt2")
    result = export(stacked(src), tmp_path / "out")
    ours, theirs = AutoTokenizer.from_pretrained(str(result.path)), AutoTokenizer.from_pretrained(str(src))
    text = "def main(argv): return sorted(argv)"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert GenerationConfig.from_pretrained(str(result.path)).eos_token_id == 0


def test_tied_head_stays_tied(tiny, tmp_path):
    src = tiny("llama", tie_word_embeddings=True)
    result = export(stacked(src), tmp_path / "out")
    names = set(all_tensors(result.path))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((result.path / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = reload(result.path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    runtime = mol.build(stacked(src), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert (runtime(IDS).logits - loaded(IDS).logits).abs().max().item() <= 1e-5


def test_small_shards_and_bf16(tiny, tmp_path):
    src = tiny("qwen2")
    result = export(stacked(src), tmp_path / "out", dtype="bfloat16", max_shard_size="150KB")
    assert len(result.shards) > 2
    assert max(s["bytes"] for s in result.shards) <= 150_000 or any(s["tensors"] == 1 for s in result.shards)
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s["file"] for s in result.shards}
    assert index["metadata"]["total_size"] == result.total_bytes
    assert all(t.dtype == torch.bfloat16 for t in all_tensors(result.path).values())
    loaded = AutoModelForCausalLM.from_pretrained(str(result.path)).eval()
    assert loaded.dtype == torch.bfloat16
    runtime = mol.build(stacked(src), device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(runtime(IDS).logits.argmax(-1), loaded(IDS).logits.argmax(-1))


def test_foreign_absolute_position_blocks_are_not_standard(tiny, tmp_path):
    """A foreign GPT-2 block gets its own position embedding added in the runtime: no standard equivalent."""
    a, b = tiny("gpt2", seed=0), tiny("gpt2", seed=1)
    recipe = mol.Recipe.from_dict(
        {"name": "g", "base": "a", "models": {"a": str(a), "b": str(b)}, "slots": ["a:0", "b:1", "a:2"]}
    )
    with pytest.raises(RecipeError, match="position embedding"):
        export(recipe, tmp_path / "std", format="standard")
    assert not (tmp_path / "std").exists()
    result = export(recipe, tmp_path / "auto")
    assert result.format == "mol" and any("position" in r for r in result.not_standard_because)


def test_trained_adapter_makes_it_a_mol_export(tiny, tmp_path):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    recipe = mol.Recipe.from_dict(
        {"name": "t", "base": "a", "models": {"a": str(a), "b": str(b)}, "slots": ["a:0", "b:1", "a:2"]}
    )
    model = mol.build(recipe, device="cpu")
    with torch.no_grad():
        model.slots[1].experts[0].adapter.into_block.bias.fill_(0.01)
    weights = mol.save_trainable(model, tmp_path / "w.safetensors")
    assert export(recipe, tmp_path / "plain").format == "standard"
    result = export(recipe, tmp_path / "trained", weights=weights)
    assert result.format == "mol"
    assert any("adapter" in r for r in result.not_standard_because)


def test_existing_folder_is_refused_and_kept(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty"):
        export(stacked(tiny("llama")), out)
    assert (out / "keep.txt").read_text() == "mine"
    export(stacked(tiny("llama")), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failure_midway_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    import mol.export.shards as shards

    real = shards.write_shard
    calls = []

    def failing(path, entries, reader):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, entries, reader)

    monkeypatch.setattr(shards, "write_shard", failing)
    with pytest.raises(StorageError, match="disk full"):
        export(stacked(tiny("llama")), tmp_path / "out", max_shard_size="100KB")
    assert list(tmp_path.iterdir()) == []
