"""MoLForCausalLM export: routed, cross-family, cross-width recipes are written with their modelling code and
reload (here through the auto classes that mol registers) with the fused runtime's logits and generations."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import mol
from mol.export import export, register_auto_classes

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "opt", "phi"]


@pytest.fixture(scope="module", autouse=True)
def _auto_classes():
    register_auto_classes()


def randomise(model, seed=0):
    """Non-uniform routers and non-identity adapters, so that the export must carry them exactly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in model.routed_slots:
            slot.router.proj.weight.copy_(torch.randn(slot.router.proj.weight.shape, generator=g) * 2.0)
        for name, p in model.trainable_parameters().items():
            if ".adapter." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def padded_batch(seed, length=12):
    ids = torch.randint(1, 380, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sequence
    return ids, mask


def assert_same_model(runtime, loaded, seed=0):
    ids, mask = padded_batch(seed)
    real = mask.bool()
    with torch.no_grad():
        diff = (runtime(ids, attention_mask=mask).logits - loaded(ids, attention_mask=mask).logits)[real]
    assert diff.abs().max().item() <= 1e-5
    ours = runtime.generate(ids[:, :7], attention_mask=mask[:, :7], max_new_tokens=6, eos_token_id=[])
    theirs = loaded.generate(
        ids[:, :7], attention_mask=mask[:, :7], max_new_tokens=6, min_new_tokens=6, do_sample=False
    )
    assert ours.tolist() == theirs.tolist()


@pytest.fixture(scope="module")
def cross(tiny):
    recipe = mol.Recipe.from_dict(
        {
            "name": "cross",
            "base": "l",
            "models": {
                "l": str(tiny("llama")),
                "g": str(tiny("gpt2", width=96)),
                "n": str(tiny("gpt_neox", width=48, layers=2)),
                "o": str(tiny("opt", width=32, layers=2)),
            },
            "slots": [
                "l:0",
                {"experts": ["l:1", "g:1"], "router": {"type": "token", "top_k": 1}},
                "g:2",
                {"experts": ["l:2", "n:0", "g:0"], "router": {"type": "token", "top_k": 2}},
                {"experts": ["l:3", "n:1"], "router": {"type": "pooled"}},
                "o:1",
            ],
        }
    )
    return recipe, randomise(mol.build(recipe, device="cpu", dtype=torch.float32))


def test_cross_family_export_reloads_as_the_same_model(cross, tmp_path):
    recipe, model = cross
    result = export(model, tmp_path / "out", max_shard_size="300KB")
    assert result.format == "mol" and result.layers == 10
    assert len(result.shards) > 1
    for name in ("modeling_mol.py", "configuration_mol.py", "model.safetensors.index.json", "tokenizer.json"):
        assert (result.path / name).is_file(), name
    cfg = json.loads((result.path / "config.json").read_text())
    assert cfg["model_type"] == "mol" and cfg["architectures"] == ["MoLForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mol.MoLForCausalLM"
    assert cfg["num_hidden_layers"] == 10  # one KV-cache layer per slot-expert
    assert {a: s["config"]["model_type"] for a, s in cfg["sources"].items()} == {
        "l": "llama",
        "g": "gpt2",
        "n": "gpt_neox",
        "o": "opt",
    }
    assert cfg["recipe"]["slots"][3]["router"] == {"type": "token", "top_k": 2}

    loaded = AutoModelForCausalLM.from_pretrained(str(result.path)).eval()
    assert type(loaded).__name__ == "MoLForCausalLM"
    assert_same_model(model, loaded)
    # The loaded model's state is the runtime's own, name for name (the shared foreign positions aside).
    theirs = loaded.state_dict()
    for name, t in model.state_dict().items():
        if name in theirs:
            assert torch.equal(t, theirs[name]), name


def test_cache_is_written_one_layer_per_expert(cross, tmp_path):
    _, model = cross
    loaded = AutoModelForCausalLM.from_pretrained(str(export(model, tmp_path / "out").path)).eval()
    ids, mask = padded_batch(3, length=9)
    with torch.no_grad():
        out = loaded(ids, attention_mask=mask, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    layers = cache.layers
    assert all(layers[i].keys.shape[-2] == 9 for i in range(7))  # plain and token-routed experts: every token
    chosen = set(cache.fused.pooled[4]["logits"].argmax(-1).tolist())
    for j in (0, 1):  # the pooled slot's experts (cache 7, 8) ran only if some sequence chose them
        assert (layers[7 + j].is_initialized if 7 + j < len(layers) else False) == (j in chosen)


def test_weights_file_exports_like_the_trained_model(cross, tmp_path):
    recipe, model = cross
    weights = mol.save_trainable(model, tmp_path / "trained.safetensors")
    from_model = export(model, tmp_path / "a")
    from_file = export(recipe, tmp_path / "b", weights=weights)

    def tensors(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})
        return out

    a, b = tensors(from_model.path), tensors(from_file.path)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    untrained = tensors(export(recipe, tmp_path / "c").path)
    name = "model.slots.1.router.proj.weight"  # MoLForCausalLM holds the network as `model`
    assert not torch.equal(untrained[name], a[name]) and untrained[name].abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_as_base_of_a_routed_recipe(tiny, tmp_path, family):
    other = tiny("gpt2", width=48) if family == "llama" else tiny("llama", width=48)
    recipe = mol.Recipe.from_dict(
        {
            "name": f"{family}-routed",
            "base": "b",
            "models": {"b": str(tiny(family)), "x": str(other)},
            "slots": [
                "b:0",
                {"experts": ["b:1", "x:1"]},
                "b:2",
                {"experts": ["b:3", "x:2"], "router": "pooled"},
            ],
        }
    )
    model = randomise(mol.build(recipe, device="cpu", dtype=torch.float32), seed=1)
    loaded = AutoModelForCausalLM.from_pretrained(str(export(model, tmp_path / "out").path)).eval()
    assert_same_model(model, loaded, seed=2)


def test_bf16_export_keeps_routers_in_float32(cross, tmp_path):
    recipe, model = cross
    result = export(model, tmp_path / "out", dtype="bfloat16")
    with safe_open(str(result.path / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.slots.1.router.proj.weight").dtype == torch.float32
        assert fh.get_tensor("model.slots.1.experts.1.adapter.into_block.weight").dtype == torch.bfloat16
        assert fh.get_tensor("model.embed.weight").dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(str(result.path)).eval()
    assert loaded.model.embed.weight.dtype == torch.bfloat16
    assert loaded.model.slots[1].router.proj.weight.dtype == torch.float32
    runtime = mol.build(recipe, device="cpu", dtype=torch.bfloat16)
    mol.load_trainable(runtime, mol.save_trainable(model, tmp_path / "w.safetensors"))
    ids, mask = padded_batch(5)
    with torch.no_grad():
        diff = (
            runtime(ids, attention_mask=mask).logits.float() - loaded(ids, attention_mask=mask).logits.float()
        )
    assert diff[mask.bool()].abs().max().item() == 0.0


def test_tied_base_head_is_not_duplicated(tiny, tmp_path):
    recipe = mol.Recipe.from_dict(
        {
            "name": "tied",
            "base": "b",
            "models": {"b": str(tiny("llama", tie_word_embeddings=True)), "x": str(tiny("gpt2", width=48))},
            "slots": ["b:0", {"experts": ["b:1", "x:1"]}, "b:2"],
        }
    )
    model = randomise(mol.build(recipe, device="cpu", dtype=torch.float32))
    result = export(model, tmp_path / "out")
    with safe_open(str(result.path / "model.safetensors"), "pt") as fh:
        assert "model.head.weight" not in set(fh.keys())
    loaded = AutoModelForCausalLM.from_pretrained(str(result.path)).eval()
    assert loaded.model.head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()
    assert_same_model(model, loaded)


@pytest.mark.parametrize(
    "family, overrides", [(f, {}) for f in FAMILIES] + [("opt", {"word_embed_proj_dim": 32})]
)
def test_identity_mol_export_reproduces_the_source_model(tiny, tmp_path, family, overrides):
    """Independent of the runtime: a one-model identity recipe written as MoLForCausalLM is the source model."""
    folder = tiny(family, **overrides)
    recipe = mol.Recipe.from_dict({"name": "id", "models": {"m": str(folder)}, "slots": ["m:0-3"]})
    loaded = AutoModelForCausalLM.from_pretrained(
        str(export(recipe, tmp_path / "out", format="mol").path)
    ).eval()
    source = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids, mask = padded_batch(7)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens, as in Mango
    with torch.no_grad():
        expected = source(ids, attention_mask=mask, position_ids=positions).logits
        diff = (expected - loaded(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= 1e-5
