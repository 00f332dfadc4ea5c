"""Hub ids resolve through the local Hub cache when offline (no network is ever touched)."""

import shutil

import torch

import mol


def fake_hub_cache(root, repo_id, folder):
    """The Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_cached_hub_id_resolves_offline(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    fake_hub_cache(tmp_path / "hub", "mango-test/tiny-llama", tiny("llama"))
    recipe = mol.Recipe.from_dict(
        {"name": "hub", "models": {"m": "mango-test/tiny-llama"}, "slots": ["m:0-3"]}
    )
    p = mol.plan(recipe)
    assert p.base.hub_id == "mango-test/tiny-llama"
    model = mol.build(p, device="cpu")
    local = mol.build(
        mol.Recipe.from_dict({"name": "l", "models": {"m": str(tiny("llama"))}, "slots": ["m:0-3"]}),
        device="cpu",
    )
    ids = torch.randint(1, 300, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, local(ids).logits)
