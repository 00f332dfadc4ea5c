"""The model card, the offline push path, and the `mol export` / `import-mergekit` / `export-mergekit` / `push`
commands."""

import json
import shutil

import pytest
import yaml

import mol
from mol.cli import main
from mol.errors import StorageError
from mol.export import export
from mol.export.push import PushError, push


@pytest.fixture
def licensed(tiny, tmp_path):
    """A copy of a tiny model whose own card declares a licence."""
    folder = tmp_path / "licensed-llama"
    shutil.copytree(tiny("llama"), folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [test]\n---\n# a model\n")
    return folder


def write_recipe(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_card_lists_recipe_sources_licences_and_evaluation(licensed, tiny, tmp_path):
    recipe = mol.Recipe.from_dict(
        {
            "name": "carded",
            "base": "a",
            "models": {"a": str(licensed), "g": str(tiny("gpt2", width=48))},
            "slots": ["a:0", {"experts": ["a:1", "g:1"]}, "a:2"],
        }
    )
    result = export(recipe, tmp_path / "out", evaluation={"perplexity/prose": 31.25, "agreement": 0.5})
    card = (result.path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "other"  # one source declares apache-2.0, the other nothing
    assert "mol" in front["tags"]
    assert "| a | licensed-llama | llama | 4 | 64 | apache-2.0 |" in card
    assert "| g |" in card and "| unknown |" in card
    assert "trust_remote_code=True" in card
    assert "| perplexity/prose | 31.25 |" in card and "| agreement | 0.5 |" in card
    assert "- g:1" in card  # the recipe itself
    # Absolute source paths are not published: only the folder name.
    assert str(licensed) not in card and str(licensed) not in (result.path / "config.json").read_text()
    assert str(licensed) not in (result.path / "mol_recipe.yaml").read_text()


def test_single_licence_is_carried_to_the_card(licensed, tmp_path):
    recipe = mol.Recipe.from_dict({"name": "one", "models": {"a": str(licensed)}, "slots": ["a:0-3"]})
    card = (export(recipe, tmp_path / "out").path / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "apache-2.0"
    assert "No evaluation results" in card


def test_push_offline_fails_before_writing_anything(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    recipe = mol.Recipe.from_dict({"name": "p", "models": {"m": str(tiny("llama"))}, "slots": ["m:0-3"]})
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(recipe, "someone/fused", token="hf_not_used")
    assert isinstance(PushError("x"), StorageError)
    assert list(tmp_path.iterdir()) == []


def test_push_without_token_fails_before_writing_anything(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    recipe = mol.Recipe.from_dict({"name": "p", "models": {"m": str(tiny("llama"))}, "slots": ["m:0-3"]})
    with pytest.raises(PushError, match="no Hugging Face token"):
        push(recipe, "someone/fused")
    with pytest.raises(PushError, match="not a Hub repository id"):
        push(recipe, "no-slash")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_standard_and_mol(tiny, tmp_path, capsys):
    plain = write_recipe(
        tmp_path, {"name": "plain", "models": {"m": str(tiny("phi"))}, "slots": ["m:0-3", "m:3"]}
    )
    assert main(["export", str(plain), str(tmp_path / "std"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "standard" and out["layers"] == 5
    assert (tmp_path / "std" / "config.json").is_file()

    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps({"perplexity": 12.5}))
    routed = write_recipe(
        tmp_path,
        {
            "name": "routed",
            "base": "m",
            "models": {"m": str(tiny("phi")), "o": str(tiny("opt", width=32))},
            "slots": ["m:0", {"experts": ["m:1", "o:1"]}],
        },
        "routed.yaml",
    )
    assert (
        main(
            [
                "export",
                str(routed),
                str(tmp_path / "mol"),
                "--dtype",
                "bfloat16",
                "--shard-size",
                "100KB",
                "--eval-json",
                str(evals),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "MoLForCausalLM" in text and "not standard: slot 1 routes" in text
    assert (tmp_path / "mol" / "model.safetensors.index.json").is_file()
    assert "| perplexity | 12.5 |" in (tmp_path / "mol" / "README.md").read_text()

    # An existing folder is refused with exit status 2 and left as it was.
    assert main(["export", str(plain), str(tmp_path / "std")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(routed), str(tmp_path / "forced"), "--format", "standard"]) == 2
    assert "cannot be exported as a standard checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "forced").exists()


def test_cli_mergekit_both_ways(tiny, tmp_path, capsys):
    folder = tiny("mistral")
    config = tmp_path / "mk.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "dtype": "bfloat16",
                "slices": [
                    {"sources": [{"model": str(folder), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(folder), "layer_range": [1, 4]}]},
                ],
            }
        )
    )
    recipe_path = tmp_path / "imported.yaml"
    assert main(["import-mergekit", str(config), "--name", "dus", "-o", str(recipe_path)]) == 0
    assert "--dtype bfloat16" in capsys.readouterr().err
    recipe = mol.Recipe.from_file(recipe_path)
    assert recipe.name == "dus" and [e.layer for s in recipe.slots for e in s.experts] == [0, 1, 1, 2, 3]

    assert main(["export-mergekit", str(recipe_path), "--dtype", "bfloat16"]) == 0
    back = yaml.safe_load(capsys.readouterr().out)
    assert [s["sources"][0]["layer_range"] for s in back["slices"]] == [[0, 2], [1, 4]]
    assert back["merge_method"] == "passthrough" and back["dtype"] == "bfloat16"

    routed = write_recipe(
        tmp_path,
        {
            "name": "r",
            "base": "m",
            "models": {"m": str(folder), "g": str(tiny("gpt2"))},
            "slots": ["m:0", {"experts": ["m:1", "g:1"]}, "m:2"],
        },
        "r.yaml",
    )
    assert main(["export-mergekit", str(routed)]) == 2
    assert "no mergekit passthrough equivalent" in capsys.readouterr().err
    bad = tmp_path / "slerp.yml"
    bad.write_text("merge_method: slerp\nslices: []\n")
    assert main(["import-mergekit", str(bad)]) == 2


def test_cli_push_offline(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = write_recipe(tmp_path, {"name": "p", "models": {"m": str(tiny("llama"))}, "slots": ["m:0-3"]})
    assert main(["push", str(recipe), "someone/fused"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
