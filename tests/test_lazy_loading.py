"""Only the tensors the plan needs are read."""

import pytest

import mol
from mol.sources import TensorInfo


def test_plan_reads_only_selected_layers_and_base_modules(tiny):
    folder = tiny("llama", layers=8)
    p = mol.plan(mol.Recipe.from_dict({"name": "two", "models": {"m": str(folder)}, "slots": ["m:2", "m:5"]}))
    names = [t.name for t in p.reads["m"]]
    layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
    assert layers == {"2", "5"}
    others = {n for n in names if not n.startswith("model.layers.")}
    assert others == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_build_reads_no_more_than_the_plan(tiny, monkeypatch):
    folder = tiny("llama", layers=8)
    recipe = mol.Recipe.from_dict({"name": "two", "models": {"m": str(folder)}, "slots": ["m:2", "m:5"]})
    p = mol.plan(recipe)
    planned = {t.name for t in p.reads["m"]}

    read: list[str] = []
    from mol import loading

    original = loading.TensorReader.get

    def spy(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(loading.TensorReader, "get", spy)
    model = mol.build(p, device="cpu")
    assert set(read) == planned
    assert len(read) == len(planned)  # each tensor read once
    whole = sum(t.nbytes for t in p.sources["m"].tensors.values())
    assert model.bytes_read == p.bytes_to_read
    assert model.bytes_read < whole * 0.45  # 2 of 8 layers plus embeddings, norm and head


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt", "phi"])
def test_other_families_read_only_their_planned_tensors(tiny, family):
    folder = tiny(family, layers=6)
    p = mol.plan(mol.Recipe.from_dict({"name": "t", "models": {"m": str(folder)}, "slots": ["m:1", "m:4"]}))
    fam = p.base.family
    for t in p.reads["m"]:
        assert isinstance(t, TensorInfo)
        if t.name.startswith(fam.layers + "."):
            assert t.name.split(".")[len(fam.layers.split("."))] in {"1", "4"}


def test_sharded_checkpoint_opens_only_needed_shards(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(tiny("llama", layers=8)))
    sharded = tmp_path / "sharded"
    src.save_pretrained(str(sharded), max_shard_size="60KB")
    for f in tiny("llama", layers=8).glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 3
    p = mol.plan(mol.Recipe.from_dict({"name": "s", "models": {"m": str(sharded)}, "slots": ["m:3"]}))
    model = mol.build(p, device="cpu")
    from mol.loading import TensorReader  # noqa: F401  (the reader opens shards lazily, per tensor)

    needed = {t.file for t in p.reads["m"]}
    assert len(needed) < len(shards)
    assert model.bytes_read == p.bytes_to_read
