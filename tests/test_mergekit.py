"""mergekit's `slices:` passthrough format: real-world shaped configs import as recipes (several slices,
repeated layers, exclusive ends), recipes that have an equivalent export as one, the others say why not, and a
round trip keeps the layer list."""

import pytest
import torch
import yaml
from safetensors import safe_open

import mol
from mol.errors import RecipeError
from mol.export import export
from mol.export.mergekit import export_mergekit, import_mergekit

# Depth up-scaling (SOLAR-style): one model, overlapping ranges, so layers 8..23 appear twice.
UPSCALE = """
slices:
  - sources:
      - model: upstage/base-7b
        layer_range: [0, 24]
  - sources:
      - model: upstage/base-7b
        layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""

# Interleaved frankenmerge (Goliath-style) of two fine-tunes, with the keys such configs usually carry.
INTERLEAVED = """
dtype: float16
merge_method: passthrough
base_model: org/xwin-70b
tokenizer_source: base
slices:
- sources:
  - layer_range: [0, 16]
    model: org/xwin-70b
- sources:
  - layer_range: [8, 24]
    model: org/euryale-70b
- sources:
  - layer_range: [17, 32]
    model: org/xwin-70b
- sources:
  - layer_range: [25, 40]
    model: org/euryale-70b
- sources:
  - layer_range: [33, 80]
    model: org/xwin-70b
"""


def layer_list(recipe):
    return [(recipe.models[e.model], e.layer) for s in recipe.slots for e in s.experts]


def test_depth_upscaling_config():
    result = import_mergekit(UPSCALE)
    r = result.recipe
    assert len(r.slots) == 24 + 24  # ends are exclusive
    assert layer_list(r)[:24] == [("upstage/base-7b", i) for i in range(24)]
    assert layer_list(r)[24:] == [("upstage/base-7b", i) for i in range(8, 32)]
    assert r.models == {"base-7b": "upstage/base-7b"} and r.base == "base-7b"
    assert all(not s.routed for s in r.slots)
    assert result.dtype == "bfloat16" and any("--dtype bfloat16" in n for n in result.notes)


def test_interleaved_two_model_config():
    result = import_mergekit(INTERLEAVED, name="goliath-like")
    r = result.recipe
    assert r.name == "goliath-like"
    assert r.models == {"xwin-70b": "org/xwin-70b", "euryale-70b": "org/euryale-70b"}
    assert r.base == "xwin-70b"
    expected = (
        [("org/xwin-70b", i) for i in range(0, 16)]
        + [("org/euryale-70b", i) for i in range(8, 24)]
        + [("org/xwin-70b", i) for i in range(17, 32)]
        + [("org/euryale-70b", i) for i in range(25, 40)]
        + [("org/xwin-70b", i) for i in range(33, 80)]
    )
    assert layer_list(r) == expected
    assert any("tokenizer_source" in n for n in result.notes)
    # The recipe re-reads as the same recipe from its own YAML.
    assert layer_list(mol.Recipe.from_yaml(r.to_yaml())) == expected


def test_model_reference_forms_and_notes():
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": {"model": {"path": "org/a", "revision": "main"}}, "layer_range": [0, 2]}]},
            {"sources": [{"model": "org/b@v1", "layer_range": [1, 2]}]},
            {"sources": [{"model": "other/a", "layer_range": [3, 5], "parameters": {"scale": 1.0}}]},
        ],
        "chat_template": "chatml",
    }
    result = import_mergekit(cfg)
    r = result.recipe
    assert set(r.models.values()) == {"org/a", "org/b", "other/a"}
    assert len(set(r.models)) == 3  # two models named 'a' get distinct aliases
    assert [e.layer for s in r.slots for e in s.experts] == [0, 1, 1, 3, 4]
    assert any("final norm and head" in n for n in result.notes)
    assert any("chat_template" in n for n in result.notes)
    assert any("revision 'v1'" in n for n in result.notes) and any(
        "revision 'main'" in n for n in result.notes
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({"merge_method": "slerp", "slices": []}, "only mergekit's 'passthrough'"),
        ({"merge_method": "passthrough", "models": [{"model": "a/b"}]}, "slices"),
        ({"merge_method": "passthrough"}, "non-empty 'slices:'"),
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [
                            {"model": "a/b", "layer_range": [0, 4]},
                            {"model": "c/d", "layer_range": [0, 4]},
                        ]
                    }
                ],
            },
            "exactly one source",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a/b", "layer_range": [4, 4]}]}],
            },
            "end is exclusive",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a/b", "layer_range": [5, 2]}]}],
            },
            "empty or negative",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a/b", "layer_range": [0, "4"]}]}],
            },
            "layer_range must be",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a/b+c/lora", "layer_range": [0, 4]}]}],
            },
            "LoRA",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [{"model": "a/b", "layer_range": [0, 4]}],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}]},
                    }
                ],
            },
            "changes the weights",
        ),
    ],
)
def test_configs_that_cannot_be_imported(config, message):
    with pytest.raises(RecipeError, match=message):
        import_mergekit(config)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        import_mergekit("slices: [\n")
    with pytest.raises(RecipeError, match="does not exist"):
        import_mergekit(tmp_path / "missing.yml")


def test_round_trip_on_real_models_and_the_passthrough_model(tiny, tmp_path):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    config = tmp_path / "frankenmerge.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "dtype": "float32",
                "slices": [
                    {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                    {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
                    {"sources": [{"model": str(a), "layer_range": [2, 4]}]},
                ],
            }
        )
    )
    recipe = import_mergekit(config).recipe
    expected = [(str(a), 0), (str(a), 1), (str(a), 2), (str(b), 1), (str(b), 2), (str(a), 2), (str(a), 3)]
    assert layer_list(recipe) == expected
    text = export_mergekit(recipe, public=False)
    assert layer_list(import_mergekit(text).recipe) == expected
    assert [s["sources"][0]["layer_range"] for s in yaml.safe_load(text)["slices"]] == [
        [0, 3],
        [1, 3],
        [2, 4],
    ]

    # The standard export of the imported recipe is the model mergekit's passthrough writes: layer i is the
    # i-th listed layer, embeddings from the first slice's model, norm and head from the last slice's.
    result = export(recipe, tmp_path / "out")
    assert result.format == "standard"
    with safe_open(str(result.path / "model.safetensors"), "pt") as out:
        for i, (folder, layer) in enumerate(expected):
            with safe_open(str(folder) + "/model.safetensors", "pt") as src:
                for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
                    assert torch.equal(
                        out.get_tensor(f"model.layers.{i}.{name}"),
                        src.get_tensor(f"model.layers.{layer}.{name}"),
                    )
        with safe_open(str(a) + "/model.safetensors", "pt") as src:
            for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                assert torch.equal(out.get_tensor(name), src.get_tensor(name))
    written = yaml.safe_load((result.path / "mergekit_config.yml").read_text())
    assert [s["sources"][0]["layer_range"] for s in written["slices"]] == [[0, 3], [1, 3], [2, 4]]


def test_recipes_without_an_equivalent_say_why(tiny, tmp_path):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    routed = mol.Recipe.from_dict(
        {
            "name": "r",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": ["a:0", {"experts": ["a:1", "b:1"]}, "a:2"],
        }
    )
    with pytest.raises(RecipeError, match="routes between 2 experts"):
        export_mergekit(routed)
    ends_foreign = mol.Recipe.from_dict(
        {"name": "e", "base": "a", "models": {"a": str(a), "b": str(b)}, "slots": ["a:0", "a:1", "b:3"]}
    )
    with pytest.raises(RecipeError, match="final norm and head"):
        export_mergekit(ends_foreign)
    cross = mol.Recipe.from_dict(
        {
            "name": "c",
            "base": "a",
            "models": {"a": str(a), "g": str(tiny("gpt2"))},
            "slots": ["a:0", "g:1", "a:2"],
        }
    )
    with pytest.raises(RecipeError, match="is gpt2"):
        export_mergekit(cross)
    plain = mol.Recipe.from_dict(
        {"name": "p", "base": "a", "models": {"a": str(a), "b": str(b)}, "slots": ["a:0", "b:1", "a:2"]}
    )
    model = mol.build(plain, device="cpu")
    with torch.no_grad():
        model.slots[1].experts[0].adapter.out_of_block.weight.mul_(1.5)
    weights = mol.save_trainable(model, tmp_path / "w.safetensors")
    assert "passthrough" in export_mergekit(plain)
    with pytest.raises(RecipeError, match="not the identity"):
        export_mergekit(plain, weights=weights)


@pytest.mark.parametrize(
    "config, message",
    [
        ("slices: [\n", "not valid YAML"),
        ("9" * 5000, "a number of"),
        ("[" * 3000 + "]" * 3000, "nested more than"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, "
            + "9" * 90
            + "]}]}]",
            "past layer",
        ),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, 4]}]}]\n? "
            + "k" * 5000
            + "\n: 1",
            None,
        ),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, 4]}]}]\n1: 2\n[3]: 4",
            "unhashable",
        ),
        ("merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, 4]}]}]\n1: 2", None),
        ("merge_method: " + "x" * 5000, "only mergekit's 'passthrough'"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: !!binary aGVsbG8=, layer_range: [0, 4]}]}]",
            "model path or Hub id",
        ),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, '"
            + "x" * 5000
            + "']}]}]",
            "layer_range must be",
        ),
        (
            "merge_method: passthrough\nparameters: {? "
            + "w" * 5000
            + " : 2}\nslices: [{sources: [{model: a, "
            "layer_range: [0, 1]}]}]",
            "changes the weights",
        ),
        (
            "merge_method: passthrough\ndtype: ["
            + ", ".join(["x"] * 5000)
            + "]\nslices: [{sources: [{model: a, "
            "layer_range: [0, 1]}]}]",
            None,
        ),
        ("!!python/name:os.system", "could not determine a constructor"),
        ("/etc/passwd", "mapping"),
    ],
)
def test_hostile_mergekit_text_fails_in_one_short_line_or_imports_with_short_notes(config, message):
    try:
        result = import_mergekit(config)
    except RecipeError as exc:
        assert message is not None and message in str(exc), str(exc)[:300]
        lines = [str(exc)]
    else:
        assert message is None
        lines = [*result.notes, result.dtype or ""]
    for line in lines:
        assert "\n" not in line and len(line) <= 400, line[:300]


def test_a_str_naming_a_mergekit_file_is_text(tmp_path):
    path = tmp_path / "mk.yml"
    path.write_text("merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, 2]}]}]\n")
    with pytest.raises(RecipeError, match="mapping"):
        import_mergekit(str(path))
    assert len(import_mergekit(path).recipe.slots) == 2  # a Path is the way to name a file
    with pytest.raises(RecipeError, match="is a folder, not a mergekit config file"):
        import_mergekit(tmp_path)
