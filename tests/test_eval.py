"""Evaluation: source rows equal the source models' own perplexity, the oracle routes by the labels, agreement
and load count what the routers chose, reports round-trip to JSON and CSV, and the CLI writes them."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import mol
from mol.cli import main
from mol.data import load_domains, tokenize_domains, windows
from mol.evaluation import evaluate, match_domains, route_by_label, score

PROSE = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings. " * 12
)
CODE = (
    "def main(argv):\n    return sorted(argv, key=len)\nimport os\nfor line in open(path):\n    print(line)\n"
    * 12
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    (d / "prose.txt").write_text(PROSE)
    (d / "code.py").write_text(CODE)
    mixed = PROSE[:300] + CODE[:300]
    (d / "mixed.txt").write_text(mixed)
    (d / "mixed.spans.json").write_text(json.dumps({"spans": [[0, 300, "prose"], [300, 600, "code"]]}))
    return d


@pytest.fixture
def recipe(tiny):
    a, b = tiny("llama"), tiny("gpt_neox", width=48)
    return mol.Recipe.from_dict(
        {
            "name": "tiny-eval",
            "base": "a",
            "models": {"a": str(a), "b": str(b)},
            "slots": [
                "a:0",
                {"experts": ["a:1", "b:1"]},
                {"experts": ["a:2", "b:2"], "router": "pooled"},
                "a:3",
            ],
        }
    )


def data(files):
    return [f"prose={files / 'prose.txt'}", f"code={files / 'code.py'}", f"mixed={files / 'mixed.txt'}"]


def test_source_rows_equal_the_source_models_own_perplexity(recipe, files):
    report = evaluate(recipe, data(files)[:1], seq_len=48, device="cpu")
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data(files)[:1]))["prose"]
    w = windows(tokens, 48)
    ref = AutoModelForCausalLM.from_pretrained(recipe.models["b"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(w.input_ids, attention_mask=w.attention_mask).logits[:, :-1]
    keep = (w.attention_mask[:, 1:] * w.attention_mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w.input_ids[:, 1:], reduction="none")[
        keep
    ]
    row = report.row("b alone").domains["prose"]
    assert row.tokens == int(keep.sum())
    assert row.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    assert [r.kind for r in report.rows] == ["fused", "source", "source"]
    assert report.rows[0].trainable_parameters == sum(
        p.numel() for p in model.trainable_parameters().values() if p.requires_grad
    )


def test_oracle_routes_every_labelled_token_to_its_domain_model(recipe, files):
    progress = []
    report = evaluate(
        recipe,
        data(files),
        seq_len=48,
        oracle=True,
        domain_experts={"prose": "a", "code": "b"},
        device="cpu",
        on_progress=lambda *a: progress.append(a),
    )
    # Every model (the sources alone, the recipe, its oracle) on every dataset, counted up to the total.
    assert [p[:2] for p in progress] == [(i, len(progress)) for i in range(1, len(progress) + 1)]
    assert len(progress) == 3 * (len(report.rows)) and progress[-1][2] == "tiny-eval oracle on mixed"
    oracle = report.row("tiny-eval oracle")
    assert oracle.domains["prose"].load["1"] == {"a:1": 1.0, "b:1": 0.0}
    assert oracle.domains["code"].load["2"] == {"a:2": 0.0, "b:2": 1.0}
    for dom in ("prose", "code", "mixed"):
        assert oracle.domains[dom].agreement == {"1": 1.0, "2": 1.0}
    # Uniform routers (zero init) pick the first expert everywhere: agreement is exactly the prose share.
    fused = report.row("tiny-eval").domains
    assert fused["prose"].agreement == {"1": 1.0, "2": 1.0} and fused["code"].agreement == {
        "1": 0.0,
        "2": 0.0,
    }
    assert 0.3 < fused["mixed"].agreement["1"] < 0.7


def test_route_by_label_restores_the_routers(recipe):
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    routers = [s.router for s in model.routed_slots]
    with route_by_label(model, ["prose", "code"], {"prose": "a", "code": "b"}) as set_labels:
        set_labels(torch.ones(1, 8, dtype=torch.long))
        trace = model(torch.arange(1, 9).unsqueeze(0)).trace
        assert all(s.chosen.eq(1).all() for s in trace.slots)
    assert [s.router for s in model.routed_slots] == routers


def test_span_labels_follow_the_sidecar(recipe, files):
    model = mol.build(recipe, device="cpu", dtype=torch.float32, load_tokenizer=True)
    tokens = tokenize_domains(model.tokenizer, load_domains(data(files)))
    mixed = tokens["mixed"]
    names = mixed.label_names
    assert names == ["prose", "code"]  # a fully span-labelled file adds no label of its own
    first, last = names[int(mixed.labels[0])], names[int(mixed.labels[-1])]
    assert (first, last) == ("prose", "code")
    switch = int((mixed.labels == names.index("code")).nonzero()[0])
    assert model.tokenizer.decode(mixed.ids[:switch].tolist()) == PROSE[:300]


def test_match_domains_picks_the_lowest_loss():
    losses = {"a": {"prose": 1.0, "code": 3.0}, "b": {"prose": 2.0, "code": 0.5}, "c": {"prose": 0.1}}
    assert match_domains(losses, ["a", "b"]) == {"prose": "a", "code": "b"}


def test_score_counts_load_over_real_tokens_only(recipe, files):
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    tokens = tokenize_domains(model.tokenizer, load_domains(data(files)[:1]))["prose"]
    res = score(model, tokens, seq_len=50)
    assert res.tokens == len(tokens) - math.ceil(len(tokens) / 50)  # every window's first token is unscored
    assert all(sum(shares.values()) == pytest.approx(1.0) for shares in res.load.values())


def test_cli_eval_writes_json_and_csv(recipe, files, tmp_path, capsys):
    path = tmp_path / "fusion.yaml"
    path.write_text(recipe.to_yaml())
    args = [
        "eval",
        str(path),
        "--seq-len",
        "48",
        "--device",
        "cpu",
        "--oracle",
        "--expert",
        "prose=a",
        "--expert",
        "code=b",
        "--out",
        str(tmp_path / "report"),
    ]
    for d in data(files):
        args += ["--data", d]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| tiny-eval (fused) |" in printed and "b alone" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["domain_experts"] == {"prose": "a", "code": "b"}
    with open(tmp_path / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    ppl = {(r["model"], r["domain"]): float(r["value"]) for r in rows if r["metric"] == "perplexity"}
    assert ppl[("a alone", "code")] == pytest.approx(report["rows"][2]["domains"]["code"]["perplexity"])
    assert len(ppl) == 4 * 3


def test_cli_train_then_run_and_eval_with_the_weights(recipe, files, tmp_path, capsys):
    path = tmp_path / "fusion.yaml"
    path.write_text(recipe.to_yaml())
    assert (
        main(
            [
                "train",
                str(path),
                "--data",
                f"prose={files / 'prose.txt'}",
                "--data",
                f"code={files / 'code.py'}",
                "--steps",
                "3",
                "--seq-len",
                "32",
                "--batch-size",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                "--router-init",
                "ridge",
            ]
        )
        == 0
    )
    weights = tmp_path / "fusion.safetensors"
    assert weights.is_file() and (tmp_path / "fusion.train.json").is_file()
    assert "trained 3 steps" in capsys.readouterr().out
    assert (
        main(["run", str(path), "--weights", str(weights), "-p", "def main", "-n", "4", "--device", "cpu"])
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(path),
                "--weights",
                str(weights),
                "--data",
                f"code={files / 'code.py'}",
                "--seq-len",
                "48",
                "--device",
                "cpu",
                "--no-sources",
            ]
        )
        == 0
    )
    assert (tmp_path / "fusion.eval.json").is_file() and (tmp_path / "fusion.eval.csv").is_file()
    assert main(["train", str(path), "--data", f"code={tmp_path / 'nope.txt'}", "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
