"""The studio engine on real tiny checkpoints and a real SQLite file: plans, the model cache, streamed
generation, stored runs and traces, hosted-mode access."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mol.errors import AccessError, MolError, ResourceError
from studio.draft_recipe import draft_recipe, draft_yaml
from studio.engine import ModelCache, StudioConfig, StudioEngine, clamp_settings


def routed_draft(engine, name="fused"):
    models = engine.embedded_models()
    return draft_recipe(
        name,
        "bard",
        "linear",
        None,
        models,
        [
            {"experts": ["bard:0"]},
            {"experts": ["bard:1", "coder:1"], "router": {"type": "token", "top_k": 1}},
            {"experts": ["bard:2", "base:1"], "router": {"type": "token", "top_k": 2}},
            {"experts": ["bard:3"]},
        ],
    )


def test_embedded_models_and_cards(engine):
    models = engine.embedded_models()
    assert list(models) == ["bard", "base", "coder"]
    card = engine.model_card("coder", models["coder"])
    assert (card["family"], card["layers"], card["width"]) == ("gpt_neox", 3, 48)
    assert card["fingerprint"] == engine.model_card("bard", models["bard"])["fingerprint"]
    assert "folder" not in card  # no server paths in what the browser sees


def test_check_valid_and_invalid_recipes(engine):
    report = engine.check(routed_draft(engine))
    assert report.ok, report.error
    assert report.summary["slots"] == 4 and report.summary["routed_slots"] == 2
    assert report.summary["memory"]["total"] > report.summary["memory"]["weights"] > 0
    assert any("different widths" in w for w in report.warnings)

    bad = routed_draft(engine)
    bad["slots"][0]["experts"] = ["bard:9"]
    report = engine.check(bad)
    assert not report.ok and "out of range" in report.error and "4 layers" in report.error

    unknown = routed_draft(engine)
    unknown["slots"][0]["experts"] = ["ghost:0"]
    assert "unknown model alias 'ghost'" in engine.check(unknown).error

    assert "needs 'name'" in engine.check({**routed_draft(engine), "name": ""}).error


def test_model_cache_is_lru_and_builds_each_key_once():
    cache = ModelCache(capacity=2)
    builds = []

    def build(key):
        def make():
            builds.append(key)
            time.sleep(0.05)
            return object()

        return make

    threads = [threading.Thread(target=cache.get, args=("a", build("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["a"]
    cache.get("b", build("b"))
    cache.get("a", build("a"))  # touch a: b is now least recent
    cache.get("c", build("c"))
    assert cache.keys() == ["a", "c"]
    assert builds == ["a", "b", "c"]


def test_run_prompt_streams_stores_the_run_and_caches_the_model(engine):
    version = engine.repo.create_recipe("fused", draft_yaml(routed_draft(engine)))
    updates = list(engine.run_prompt(version.id, "To be, or not", {"max_new_tokens": 6}))
    partial, final = updates[:-1], updates[-1]
    assert len(partial) >= 1 and all(not u.done for u in partial)
    assert final.done and final.run_id is not None
    run = engine.repo.get_run(final.run_id)
    assert run.version_id == version.id and run.output_text == final.text
    assert run.settings["max_new_tokens"] == 6
    trace = run.trace
    prompt_len = len(engine.fused_for_version(version.id)[0].tokenizer("To be, or not")["input_ids"])
    new_tokens = len(partial)
    assert len(trace["tokens"]) == prompt_len + new_tokens - 1  # the last new token is never read back
    assert [s["experts"] for s in trace["slots"]] == [["bard:1", "coder:1"], ["bard:2", "base:1"]]
    assert all(len(s["probs"]) == len(trace["tokens"]) for s in trace["slots"])
    assert all(len(row) == 2 for row in trace["slots"][1]["chosen"])  # top_k=2 there
    assert engine.cache.keys() == [("version", version.id, None)]
    list(engine.run_prompt(version.id, "again", {"max_new_tokens": 2}))
    assert engine.cache.keys() == [("version", version.id, None)]
    assert len(engine.repo.list_runs()) == 2


class StopCheckedInStep(threading.Event):
    """A stop flag whose every check by the generating thread waits until the reader has taken the update of
    that step (`taken()`): a tiny model otherwise runs more tokens ahead of a reader that is slow to get the
    CPU than the bounds below allow, and whether the stop works would depend on the machine's load."""

    def __init__(self) -> None:
        super().__init__()
        self.reader = threading.current_thread()
        self._taken = threading.Semaphore(0)

    def taken(self) -> None:
        self._taken.release()

    def is_set(self) -> bool:
        if threading.current_thread() is not self.reader:
            self._taken.acquire(timeout=60)
        return super().is_set()


def test_stopping_ends_generation_early(engine):
    version = engine.repo.create_recipe(
        "plain",
        draft_yaml(
            draft_recipe("plain", "bard", "linear", None, engine.embedded_models(), [{"experts": ["bard:0"]}])
        ),
    )
    model, _ = engine.fused_for_version(version.id)
    unstopped = sum(1 for _ in engine.stream(model, "def main", {"max_new_tokens": 30}))
    assert unstopped > 10  # this prompt does not hit end-of-text early, so a short run means the stop worked
    stop = StopCheckedInStep()
    seen = 0
    for _update in engine.stream(model, "def main", {"max_new_tokens": 30}, stop):
        seen += 1
        if seen == 3:
            stop.set()
        stop.taken()
    assert seen < 10


def test_a_stopped_run_is_shown_not_stored_and_the_next_one_is_whole(engine):
    version = engine.repo.create_recipe(
        "stoppable",
        draft_yaml(
            draft_recipe(
                "stoppable", "bard", "linear", None, engine.embedded_models(), [{"experts": ["bard:0"]}]
            )
        ),
    )
    stop = StopCheckedInStep()
    updates = []
    for update in engine.run_prompt(version.id, "def main", {"max_new_tokens": 30}, stop):
        updates.append(update)
        if len(updates) == 3:
            stop.set()
        stop.taken()
    final = updates[-1]
    assert final.done and final.run_id is None and final.trace is not None  # shown with its trace, not saved
    assert len(updates) < 10
    assert engine.repo.list_runs(version_id=version.id) == []
    early = threading.Event()
    early.set()  # stopped while waiting for its turn: nothing runs, nothing is stored
    assert list(engine.run_prompt(version.id, "def main", {"max_new_tokens": 30}, early)) == []
    assert engine.gate.snapshot()["running"] == 0
    whole = list(engine.run_prompt(version.id, "def main", {"max_new_tokens": 30}, threading.Event()))
    assert whole[-1].run_id is not None and len(whole) > 10


def test_source_model_alone_and_limits(engine):
    models = engine.embedded_models()
    text = engine.run_source("coder", models["coder"], "import os", {"max_new_tokens": 4})
    assert isinstance(text, str)
    assert ("source", "coder", models["coder"]) in engine.cache.keys()
    engine.config.max_prompt_tokens = 4
    with pytest.raises(ResourceError, match="at most 4"):
        list(
            engine.stream(
                engine.fused_for_source("coder", models["coder"]), "one two three four five six", {}
            )
        )


def test_clamp_settings():
    s = clamp_settings({"max_new_tokens": 10_000, "temperature": 0, "top_p": 3, "top_k": -5}, 64)
    assert s == {
        "max_new_tokens": 64,
        "do_sample": False,
        "temperature": 0.05,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 0,
    }


def test_hosted_mode_only_opens_allowed_models(engine, models_dir, tiny, monkeypatch):
    monkeypatch.setattr(engine.config, "hosted", True)  # what StudioConfig.from_env makes of the env below
    monkeypatch.setattr(engine.config, "model_dirs", [models_dir])
    monkeypatch.setenv("MANGO_HOSTED", "1")
    monkeypatch.setenv("MANGO_MODEL_DIRS", str(models_dir))
    assert engine.model_card("bard", engine.embedded_models()["bard"])["layers"] == 4
    outside = tiny("llama", width=32, layers=2)
    with pytest.raises(AccessError, match="outside the folders"):
        engine.model_card("x", str(outside))
    with pytest.raises(AccessError, match="Hub"):
        engine.model_card("x", "org/some-model")
    report = engine.check(draft_recipe("x", "x", "linear", None, {"x": str(outside)}, [{"experts": ["x:0"]}]))
    assert not report.ok and "outside the folders" in report.error
    version = engine.repo.create_recipe("hosted", draft_yaml(routed_draft(engine, "hosted")))
    with pytest.raises(ResourceError, match="characters"):
        next(engine.run_prompt(version.id, "x" * 5000, {"max_new_tokens": 4}))
    assert StudioConfig.from_env().hosted and StudioConfig.from_env().max_new_tokens <= 256


def test_train_then_generate_and_evaluate_with_the_trained_weights(engine, tmp_path):
    from tests.tiny_models import CORPUS

    engine.config.data_dir = tmp_path / "data"
    prose, code = tmp_path / "prose.txt", tmp_path / "code.txt"
    prose.write_text(CORPUS.split("def main")[0] * 3)
    code.write_text(("def main" + CORPUS.split("def main")[1]) * 3)
    data = {"prose": [prose], "code": [code]}
    version = engine.repo.create_recipe("to-train", draft_yaml(routed_draft(engine, "to-train")))

    progress = list(
        engine.train_version(
            version.id, data, {"steps": 6, "batch_size": 2, "seq_len": 32}, poll_seconds=0.05
        )
    )
    final = progress[-1]
    assert (final.status, final.step, len(final.curve)) == ("completed", 6, 6)
    stored = engine.repo.get_training_run(final.training_run_id)
    assert stored.status == "completed" and stored.version_id == version.id
    assert [p["step"] for p in stored.loss_curve] == [1, 2, 3, 4, 5, 6]
    assert stored.config["train"]["steps"] == 6 and set(stored.config["data"]) == {"prose", "code"}
    assert stored.weights_path and (tmp_path / "data" / "weights").is_dir()

    untrained = list(engine.run_prompt(version.id, "To be", {"max_new_tokens": 3}))[-1]
    trained = list(engine.run_prompt(version.id, "To be", {"max_new_tokens": 3}, None, stored.id))[-1]
    assert engine.repo.get_run(trained.run_id).settings["training_run_id"] == stored.id
    assert (
        untrained.trace["slots"][0]["probs"] != trained.trace["slots"][0]["probs"]
    )  # routers learned something

    info = engine.evaluate_version(version.id, data, stored.id, sources=True, seq_len=32, max_tokens=400)
    assert info.training_run_id == stored.id
    names = [r["name"] for r in info.results["rows"]]
    assert names[0] == "to-train" and {"bard alone", "coder alone", "base alone"} <= set(names)
    assert all(r["domains"]["prose"]["perplexity"] > 1 for r in info.results["rows"])
    assert engine.repo.list_evaluations(version_id=version.id)[0].id == info.id


def test_failed_training_is_recorded(engine, tmp_path):
    engine.config.data_dir = tmp_path / "data"
    version = engine.repo.create_recipe("no-data", draft_yaml(routed_draft(engine)))
    with pytest.raises(MolError, match="does not exist"):
        list(engine.train_version(version.id, {"prose": [tmp_path / "missing.txt"]}, {"steps": 2}))
    run = engine.repo.list_training_runs(version_id=version.id)[0]
    assert run.status == "failed" and "does not exist" in run.error


def test_builtin_datasets(engine, tmp_path):
    upload = tmp_path / "my notes.txt"
    upload.write_text("hello")
    data = engine.datasets(["prose", "mixed"], [str(upload)], "test")
    assert list(data) == ["prose", "mixed", "my_notes"]
    assert all(p.is_file() for paths in data.values() for p in paths)
    with pytest.raises(MolError, match="at least one"):
        engine.datasets([], [], "train")


def test_recipe_files_keep_working_once_stored(engine, models_dir, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    relative = os.path.relpath(models_dir / "mango-bard", folder)  # as the shipped examples: "../models/..."
    (folder / "example.yaml").write_text(
        f"name: example\nbase: bard\nmodels: {{bard: {relative}}}\nslots: [bard:0-1]\n"
    )
    recipe = engine.recipe_from_file(folder / "example.yaml")
    assert recipe.models["bard"] == str(
        (models_dir / "mango-bard").resolve()
    )  # no longer relative to the file
    assert engine.check(recipe.to_dict()).ok


def test_shipped_example_recipes_open_and_plan(tmp_path):
    engine = StudioEngine(StudioConfig(db_url=f"sqlite:///{tmp_path / 'studio.db'}"))  # the shipped folders
    examples = sorted(engine.config.recipes_dir.glob("*.yaml"))
    assert examples
    for path in examples:
        recipe = engine.recipe_from_file(path)
        assert all(ref.startswith("assets/models/") for ref in recipe.models.values()), recipe.models
        report = engine.check(recipe.to_dict())
        assert report.ok, (path.name, report.error)
