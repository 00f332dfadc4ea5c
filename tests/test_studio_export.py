"""Exporting and pushing a saved version from the studio: a downloadable model folder that loads with plain
transformers, and a push that fails cleanly, leaving nothing behind, when offline."""

from __future__ import annotations

import zipfile

import pytest
import torch

from mol.errors import MolError
from studio.draft_recipe import draft_recipe, draft_yaml


def save(engine, slots, name):
    draft = draft_recipe(name, "bard", "linear", None, engine.embedded_models(), slots)
    return engine.repo.create_recipe(name, draft_yaml(draft))


def test_plain_stack_exports_as_its_own_architecture(engine, tmp_path):
    from transformers import AutoModelForCausalLM

    v = save(engine, [{"experts": ["bard:0"]}, {"experts": ["bard:2"]}, {"experts": ["bard:3"]}], "stack")
    archive = engine.export_version(v.id)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "out")
    folder = next((tmp_path / "out").iterdir())
    exported = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert exported.config.num_hidden_layers == 3
    fused, _ = engine.fused_for_version(v.id)
    ids = torch.randint(1, 300, (1, 7))
    with torch.no_grad():
        assert (exported(ids).logits - fused(ids).logits).abs().max() <= 1e-5


def test_routed_recipe_exports_as_mol_folder(engine):
    v = save(
        engine,
        [{"experts": ["bard:0"]}, {"experts": ["bard:1", "coder:1"], "router": {"type": "token"}}],
        "routed",
    )
    with zipfile.ZipFile(engine.export_version(v.id)) as z:
        names = z.namelist()
    assert any(n.endswith("modeling_mol.py") for n in names)
    with pytest.raises(MolError):
        engine.export_version(v.id, fmt="standard")  # routed slots cannot be a plain architecture


def test_push_offline_fails_clearly(engine, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    v = save(engine, [{"experts": ["bard:0"]}], "push-me")
    with pytest.raises(MolError):
        engine.push_version(v.id, "someone/model", token="hf_fake")
    with pytest.raises(MolError, match="own Hugging Face token"):
        monkeypatch.setattr(engine.config, "hosted", True)
        engine.push_version(v.id, "someone/model", token="")
