"""The embedded demo family: shipped folders load with plain transformers, share one tokenizer, fit the size
budget; the same-seed branches of mango-base keep its architecture and fuse exactly; the family's bars hold in the
committed bench; the shipped corpora and recipes are consistent; the training script runs end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "assets" / "models"
CORPORA = ROOT / "assets" / "corpora"
RECIPES = ROOT / "assets" / "recipes"
NAMES = ("mango-bard", "mango-coder", "mango-base")
BRANCHES = ("mango-base-prose", "mango-base-code")  # same-seed branches of mango-base
FAMILY = NAMES + BRANCHES
EOS = "<|endoftext|>"


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILY)
def shipped(request):
    folder = MODELS / request.param
    assert (folder / "model.safetensors").exists(), f"{request.param} weights are missing"
    return folder


def test_model_loads_and_generates_greedily(shipped):
    tok = AutoTokenizer.from_pretrained(str(shipped))
    model = AutoModelForCausalLM.from_pretrained(str(shipped), dtype=torch.float32)
    ids = tok("To be, or not", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    again = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out, again)
    assert isinstance(tok.decode(out[0]), str)


def test_folder_is_a_standard_checkpoint(shipped):
    config = json.loads((shipped / "config.json").read_text())
    gen = json.loads((shipped / "generation_config.json").read_text())
    assert config["dtype"] == "float32" and config["vocab_size"] == 4096  # compute dtype; stored as fp16
    header_len = int.from_bytes((shipped / "model.safetensors").open("rb").read(8), "little")
    with (shipped / "model.safetensors").open("rb") as f:
        f.seek(8)
        header = json.loads(f.read(header_len))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert gen["bos_token_id"] == gen["eos_token_id"] == gen["pad_token_id"] == 0
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= {p.name for p in shipped.iterdir()}
    assert not list(shipped.glob("*.bin"))
    card = (shipped / "README.md").read_text()
    assert "python -m mol.demo.train" in card and "perplexity" in card.lower()


def test_tokenizer_round_trips_and_is_shared():
    folders = [MODELS / n for n in FAMILY]
    texts = [
        "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
        "def f(x):\n\treturn {'a': [x ** 2 for _ in range(3)]}  # comment\n",
        f"ünïcödé — “quotes” {EOS} after",
    ]
    tokenizers = [AutoTokenizer.from_pretrained(str(f)) for f in folders]
    first = tokenizers[0]
    assert len(first) == 4096 and first.eos_token == EOS and first.eos_token_id == 0
    for tok in tokenizers[1:]:
        assert tok.get_vocab() == first.get_vocab()
    for text in texts:
        ids = first(text)["input_ids"]
        assert first.decode(ids) == text
    assert first(EOS)["input_ids"] == [0]
    # Same bytes on disk: one tokenizer for the whole family.
    blobs = {(f / "tokenizer.json").read_bytes() for f in folders}
    assert len(blobs) == 1


def test_total_weights_within_budget():
    files = [MODELS / n / "model.safetensors" for n in NAMES]
    assert sum(f.stat().st_size for f in files) <= 24 * 2**20
    branches = [MODELS / n / "model.safetensors" for n in BRANCHES]
    assert sum(f.stat().st_size for f in files + branches) <= 40 * 2**20


def test_specialists_differ_in_family_and_width():
    configs = {n: json.loads((MODELS / n / "config.json").read_text()) for n in NAMES}
    assert [configs[n]["model_type"] for n in NAMES] == ["llama", "gpt_neox", "gpt2"]
    widths = {
        configs["mango-bard"]["hidden_size"],
        configs["mango-coder"]["hidden_size"],
        configs["mango-base"]["n_embd"],
    }
    assert len(widths) == 3


def _bench_ppl() -> dict[str, dict[str, float]]:
    rows = json.loads((ROOT / "bench" / "demo_family.json").read_text())["models"]
    return {n: {d: rows[n]["test"][d]["ppl"] for d in ("prose", "code", "mixed")} for n in rows}


def test_bench_shows_specialists_best_on_their_domain():
    rows = json.loads((ROOT / "bench" / "demo_family.json").read_text())["models"]
    ppl = {n: {d: rows[n]["test"][d]["ppl"] for d in ("prose", "code", "mixed")} for n in NAMES}
    assert min(ppl, key=lambda n: ppl[n]["prose"]) == "mango-bard"
    assert min(ppl, key=lambda n: ppl[n]["code"]) == "mango-coder"
    assert ppl["mango-bard"]["prose"] < ppl["mango-base"]["prose"] < ppl["mango-coder"]["prose"]
    assert ppl["mango-coder"]["code"] < ppl["mango-base"]["code"] < ppl["mango-bard"]["code"]


# ---------------------------------------------------------------------------------------------------- corpora


def test_corpora_manifest_and_disjoint_splits():
    manifest = json.loads((CORPORA / "manifest.json").read_text())
    for domain in ("prose", "code"):
        splits = manifest["splits"][domain]
        files = {s: set(splits[s]["files"]) for s in ("train", "valid", "test")}
        assert all(files.values())
        assert not files["train"] & files["valid"]
        assert not files["train"] & files["test"]
        assert not files["valid"] & files["test"]
        for split in ("train", "valid", "test"):
            shipped = manifest["shipped"][f"{domain}/{split}.txt"]
            assert set(shipped["files"]) <= files[split]
            path = CORPORA / domain / f"{split}.txt"
            assert path.stat().st_size == shipped["bytes"] > 100_000
            assert path.read_text(encoding="utf-8").count(EOS) == len(shipped["files"]) - 1
    assert manifest["sources"]["code"]["python"]


def test_mixed_test_interleaves_domains():
    text = (CORPORA / "mixed_test.txt").read_text(encoding="utf-8")
    spans = json.loads((CORPORA / "mixed_test.spans.json").read_text())["spans"]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    domains = [s[2] for s in spans]
    assert set(domains) == {"prose", "code"}
    assert all(a != b for a, b in zip(domains, domains[1:], strict=False))
    prose = (CORPORA / "prose" / "test.txt").read_text(encoding="utf-8")
    code = (CORPORA / "code" / "test.txt").read_text(encoding="utf-8")
    for start, end, domain in spans[:6]:
        assert text[start:end] in (prose if domain == "prose" else code)


def test_split_rule_is_stable():
    from mol.demo.corpora import split_of

    manifest = json.loads((CORPORA / "manifest.json").read_text())
    for domain in ("prose", "code"):
        for split, entry in manifest["splits"][domain].items():
            for name in entry["files"][:20]:
                assert split_of(domain, name) == split


# ---------------------------------------------------------------------------------------------------- recipes


def _layers(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return config.get("num_hidden_layers", config.get("n_layer"))


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_references_existing_layers(recipe):
    from mol.recipe import Recipe

    parsed = Recipe.from_file(RECIPES / recipe)  # shorthand slots expand to the canonical form
    assert parsed.name == recipe.removesuffix(".yaml")
    assert parsed.base in parsed.models
    for alias, rel in parsed.models.items():
        folder = (RECIPES / rel).resolve()
        assert folder.parent == MODELS.resolve(), alias
    for slot in parsed.slots:
        assert slot.experts
        if len(slot.experts) > 1:
            assert slot.router.type in ("token", "pooled")
        for ref in slot.experts:
            assert 0 <= ref.layer < _layers(RECIPES / parsed.models[ref.model])


def test_expected_recipes_are_shipped():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"plain-stack", "prose-code-token", "prose-code-pooled", "cross-width-base"} <= names
    assert {"branches-token", "branches-pooled"} <= names  # the same-seed branch pair


# ---------------------------------------------------------------------------------------------------- script


def test_training_script_smoke_run(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mol.demo.train", "--smoke", "--out", str(tmp_path), "--no-timing"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in FAMILY:
        folder = tmp_path / "models" / name
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        out = model.generate(**tok("def", return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert out.shape[1] >= 2
        assert (folder / "README.md").exists() and (folder / "training.json").exists()
    for name in BRANCHES:  # started from the smoke run's own mango-base, trained on one domain
        training = json.loads((tmp_path / "models" / name / "training.json").read_text())
        assert training["base"]["model"] == "mango-base"
        assert training["trained_on"] == [name.removeprefix("mango-base-")]
    result = json.loads((tmp_path / "bench" / "demo_family.json").read_text())
    assert set(result["models"]) == set(FAMILY)
    assert {b["group"] for b in result["bars"]} == {"from scratch", "same-seed branches"}
    assert (tmp_path / "bench" / "demo_family.md").read_text().startswith("# Demo family")


# ---------------------------------------------------------------------------------------------------- branches


@pytest.mark.parametrize("name", BRANCHES)
def test_branch_keeps_its_base_architecture_and_records_its_training(name):
    base = json.loads((MODELS / "mango-base" / "config.json").read_text())
    config = json.loads((MODELS / name / "config.json").read_text())
    drop = ("transformers_version",)
    assert {k: v for k, v in config.items() if k not in drop} == {
        k: v for k, v in base.items() if k not in drop
    }
    training = json.loads((MODELS / name / "training.json").read_text())
    domain = name.removeprefix("mango-base-")
    assert training["trained_on"] == [domain]
    assert training["base"]["model"] == "mango-base"
    base_weights = (MODELS / "mango-base" / "model.safetensors").read_bytes()
    assert training["base"]["weights_sha256"] == __import__("hashlib").sha256(base_weights).hexdigest()
    chosen = min(training["candidates"], key=lambda c: c["valid_loss"])
    assert training["final"]["epochs"] == chosen["epochs"]  # picked by validation loss, not by hand
    assert set(training["final"]["valid"]) == {"prose", "code"}
    # Trained on further, not a copy of its base.
    assert (MODELS / name / "model.safetensors").read_bytes() != base_weights


@pytest.mark.parametrize("name", BRANCHES)
def test_branch_one_expert_recipe_reproduces_transformers(name):
    import mol

    folder = MODELS / name
    layers = json.loads((folder / "config.json").read_text())["n_layer"]
    recipe = mol.Recipe.from_dict(
        {"name": "identity", "models": {"m": str(folder)}, "slots": [f"m:0-{layers - 1}"]}
    )
    assert len(recipe.slots) == layers and all(len(slot.experts) == 1 for slot in recipe.slots)
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(
        str(folder), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(["To be, or not to be", "def read(path):\n    with open"], return_tensors="pt", padding=True)
    ids = ids["input_ids"][:, :6]
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_bench_shows_each_branch_best_on_its_domain():
    ppl = _bench_ppl()
    pair = ("mango-base", *BRANCHES)
    assert min(pair, key=lambda n: ppl[n]["prose"]) == "mango-base-prose"
    assert min(pair, key=lambda n: ppl[n]["code"]) == "mango-base-code"
    # The base, trained on both, lies between its branches.
    assert ppl["mango-base-prose"]["prose"] < ppl["mango-base"]["prose"] < ppl["mango-base-code"]["prose"]
    assert ppl["mango-base-code"]["code"] < ppl["mango-base"]["code"] < ppl["mango-base-prose"]["code"]
    result = json.loads((ROOT / "bench" / "demo_family.json").read_text())
    bars = [b for b in result["bars"] if b["group"] == "same-seed branches"]
    assert len(bars) == 4 and {b["domain"] for b in bars} == {"prose", "code"}
    for bar in result["bars"]:  # the recorded verdicts agree with the numbers they were drawn from
        assert bar["ppl"] == {m: ppl[m][bar["domain"]] for m in bar["ppl"]}
        assert bar["met"]
