"""Seeding the shipped examples (studio.seed): real SQLite files, the real assets. A fresh database gets every
example recipe and every shipped trained fusion as a named trained result; seeding again adds nothing; a user's
recipe is never touched; a damaged or missing file is skipped and the rest still seeded. Also the names weight
pickers show, the fusion the Playground opens on, the same-name check before a save, and revision 0003."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from mol.recipe import Recipe
from studio.db import Repository, ShippedWeights, create_db_engine, head_revision, upgrade
from studio.db.engine import current_revision, downgrade
from studio.db.models import Recipe as RecipeRow
from studio.db.models import RecipeVersion, ShippedAsset, TrainingRun
from studio.seed import (
    SHIPPED_FUSION_PREFERENCE,
    best_shipped_fusion,
    check_safetensors,
    recorded_mixed_perplexity,
    seed_shipped,
)

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
SHIPPED_RECIPES = sorted((ASSETS / "recipes").glob("*.yaml"))
SHIPPED_WEIGHTS = sorted((ASSETS / "weights").glob("*.safetensors"))
LABEL_OF_RUN = re.compile(r"^.+ v\d+ · run \d+ · \d+ steps? · \d{4}-\d\d-\d\d \d\d:\d\d$")


def _repo(tmp_path: Path, name: str = "studio.db") -> Repository:
    return Repository(f"sqlite:///{tmp_path / name}")


def _record(weights: Path) -> dict:
    return json.loads(
        weights.with_name(weights.name.removesuffix(".safetensors") + ".train.json").read_text()
    )


def _fused_labels(repo: Repository) -> list[str]:
    """The trained results of the single-stream fusions these tests damage (the lanes fusions ship beside them)."""
    return [label for label, _ in repo.trained_result_choices() if label.startswith("fused-")]


def _counts(repo: Repository) -> dict[str, int]:
    with repo.engine.connect() as conn:
        return {
            m.__tablename__: conn.scalar(select(func.count()).select_from(m))
            for m in (RecipeRow, RecipeVersion, TrainingRun, ShippedAsset)
        }


@pytest.fixture
def assets_copy(tmp_path):
    """A copy of assets/ to damage (recipes and weights copied, models linked), in a folder of its own so model
    paths are stored relative to it as they are to the repository."""
    root = tmp_path / "checkout"
    dest = root / "assets"
    (dest / "recipes").mkdir(parents=True)
    shutil.copytree(ASSETS / "weights", dest / "weights")
    for p in SHIPPED_RECIPES:
        shutil.copy(p, dest / "recipes" / p.name)
    (dest / "models").symlink_to(ASSETS / "models", target_is_directory=True)
    return dest


def test_assets_are_what_these_tests_expect():
    assert len(SHIPPED_RECIPES) >= 2 and len(SHIPPED_WEIGHTS) >= 2
    for w in SHIPPED_WEIGHTS:
        assert check_safetensors(w) > 0
        assert Recipe.from_yaml(_record(w)["recipe"]).name in {p.stem for p in SHIPPED_RECIPES}


def test_fresh_database_gets_every_shipped_recipe_and_weights(tmp_path):
    repo = _repo(tmp_path)
    report = seed_shipped(repo, ASSETS)
    assert report.skipped == ()
    assert sorted(report.added_recipes) == sorted(p.stem for p in SHIPPED_RECIPES)

    from studio.engine import StudioConfig, StudioEngine  # what the studio itself makes of the example files

    engine = StudioEngine(StudioConfig(db_url=repo.url))
    for path in SHIPPED_RECIPES:
        info = repo.find_recipe(path.stem)
        assert info is not None and info.latest_version == 1, path.name
        version = repo.get_version(info.id, 1)
        assert (
            version.yaml_text == engine.recipe_from_file(path).to_yaml()
        )  # as a save from the board stores it
        assert version.note.startswith(f"Shipped example (assets/recipes/{path.name})")
        assert engine.check(engine.recipe_from_yaml(version.yaml_text).to_dict()).ok

    results = repo.list_trained_results()
    assert len(results) == len(SHIPPED_WEIGHTS)
    for w in SHIPPED_WEIGHTS:
        record = _record(w)
        name = Recipe.from_yaml(record["recipe"]).name
        [r] = [r for r in results if r.shipped_asset == w.name]
        assert r.recipe_name == name and r.run.version_number == 1
        assert r.label == f"{name} v1 · shipped"
        assert r.shipped and r.run.status == "completed" and r.run.finished_at is not None
        assert Path(r.run.weights_path) == w.resolve()
        assert r.run.loss_curve == record["curve"]
        assert r.run.config["train"] == record["config"]
        assert r.run.metrics["final_loss"] == record["metrics"]["final_loss"]
        # portable: relative to the repository
        assert r.run.config["data"]["prose"] == ["assets/corpora/prose/train.txt"]
        # the engine takes it as it takes a training run of its own
        assert engine.trained_weights(r.version_id, r.id) == w.resolve()
        assert repo.trained_result_choices(r.version_id) == [(r.label, r.id)]
    # the studio's training-run list sees them as completed runs of their version
    assert {t.id for t in repo.list_training_runs()} == {r.id for r in results}
    repo.close()


def test_seeding_twice_adds_nothing(tmp_path):
    repo = _repo(tmp_path)
    seed_shipped(repo, ASSETS)
    before = _counts(repo)
    choices = repo.trained_result_choices()
    again = seed_shipped(repo, ASSETS)
    assert again.added_recipes == () and again.added_training_runs == () and again.skipped == ()
    assert {r.status for r in again.results} == {"present"}
    other = _repo(tmp_path)  # another process starting on the same file
    seed_shipped(other, ASSETS)
    assert _counts(repo) == before and repo.trained_result_choices() == choices
    assert before["recipes"] == len(SHIPPED_RECIPES) and before["training_runs"] == len(SHIPPED_WEIGHTS)
    other.close()
    repo.close()


def test_a_users_recipe_of_the_same_name_is_not_touched(tmp_path):
    repo = _repo(tmp_path)
    mine = "name: fused-token\nbase: bard\nmodels: {bard: assets/models/mango-bard}\nslots: [bard:0]\n"
    v = repo.create_recipe("fused-token", mine, note="mine")
    other = repo.create_recipe("my own", mine.replace("fused-token", "my own"))
    report = seed_shipped(repo, ASSETS)
    [r] = [r for r in report.results if r.recipe_name == "fused-token"]
    assert r.status == "name-taken" and r.version_id is None and r.added_training_runs == ()
    assert [(x.number, x.yaml_text, x.note) for x in repo.list_versions(v.recipe_id)] == [(1, mine, "mine")]
    assert repo.list_training_runs(recipe_id=v.recipe_id) == []
    assert repo.list_versions(other.recipe_id)[-1].number == 1
    # the rest is seeded, and the token fusion's weights went nowhere
    assert set(report.added_recipes) == {p.stem for p in SHIPPED_RECIPES} - {"fused-token"}
    assert all(not r.label.startswith("fused-token ") for r in repo.list_trained_results())
    assert best_shipped_fusion(repo).version.recipe_name == "lanes-trio"  # the best of what was seeded
    assert seed_shipped(repo, ASSETS).added_recipes == ()
    repo.close()


def test_what_the_user_did_with_a_seeded_recipe_stands(tmp_path):
    repo = _repo(tmp_path)
    seed_shipped(repo, ASSETS)
    token, pooled, plain = (repo.find_recipe(n) for n in ("fused-token", "fused-pooled", "plain-stack"))
    v1 = repo.get_version(token.id, 1).yaml_text
    repo.save_version(token.id, v1.replace("top_k: 1", "top_k: 2", 1), note="edited")
    repo.delete_recipe(pooled.id)
    repo.rename_recipe(plain.id, "my stack")
    before = _counts(repo)
    report = seed_shipped(repo, ASSETS)
    assert report.added_recipes == () and _counts(repo) == before  # nothing brought back or added
    assert repo.find_recipe("fused-pooled") is None and repo.find_recipe("plain-stack") is None
    assert repo.get_recipe(token.id).latest_version == 2
    # a deleted recipe's results are not offered, a renamed one's under its new name
    assert _fused_labels(repo) == ["fused-token v1 · shipped"]
    repo.close()


def test_missing_or_damaged_files_are_skipped_the_rest_seeded(tmp_path, assets_copy, caplog):
    (assets_copy / "weights" / "fused-pooled.safetensors").unlink()  # missing weights
    (assets_copy / "recipes" / "plain-stack.yaml").write_text("name: plain-stack\nslots: [[[\n")  # not YAML
    (assets_copy / "recipes" / "cross-width-base.yaml").write_bytes(b"\xff\xfe not utf-8")
    repo = _repo(tmp_path)
    with caplog.at_level(logging.WARNING, logger="studio.seed"):
        report = seed_shipped(repo, assets_copy)
    damaged = {"plain-stack", "cross-width-base"}  # every other shipped example is seeded
    assert sorted(report.added_recipes) == sorted(
        p.stem for p in (assets_copy / "recipes").glob("*.yaml") if p.stem not in damaged
    )
    assert {"fused-pooled", "fused-token", "prose-code-pooled", "prose-code-token"} <= set(
        report.added_recipes
    )
    assert len(report.skipped) == 3
    for what in ("fused-pooled.train.json", "plain-stack.yaml", "cross-width-base.yaml"):
        assert any(s.startswith(what) for s in report.skipped), report.skipped
        assert what in caplog.text
    assert _fused_labels(repo) == ["fused-token v1 · shipped"]
    # model folders are stored relative to the checkout the assets are in
    yaml_text = repo.get_version(repo.find_recipe("fused-token").id, 1).yaml_text
    assert "base: assets/models/mango-base" in yaml_text

    # the file comes back (a repaired checkout): its weights are added to the seeded version, nothing else
    shutil.copy(ASSETS / "weights" / "fused-pooled.safetensors", assets_copy / "weights")
    again = seed_shipped(repo, assets_copy)
    assert again.added_recipes == () and len(again.added_training_runs) == 1
    assert sorted(_fused_labels(repo)) == [
        "fused-pooled v1 · shipped",
        "fused-token v1 · shipped",
    ]
    repo.close()


def test_damaged_weights_and_run_files_are_skipped(tmp_path, assets_copy):
    w = assets_copy / "weights" / "fused-token.safetensors"
    w.write_bytes(w.read_bytes()[:-100])  # truncated
    (assets_copy / "weights" / "fused-pooled.train.json").write_text("{not json")
    (assets_copy / "weights" / "stray.safetensors").write_bytes(w.read_bytes())  # no run file
    repo = _repo(tmp_path)
    report = seed_shipped(repo, assets_copy)
    assert len(report.added_recipes) == len(SHIPPED_RECIPES)  # every recipe, no weights
    assert _fused_labels(repo) == []
    best = best_shipped_fusion(repo)  # only what else ships (the lanes fusions) is left to open on
    assert best is None or best.version.recipe_name.startswith("lanes-")
    assert sorted(s.split(":")[0] for s in report.skipped) == [
        "fused-pooled.train.json",
        "fused-token.train.json",
        "stray.safetensors",
    ]
    assert "truncated" in " ".join(report.skipped)
    repo.close()


def test_weights_trained_for_another_recipe_are_not_attached(tmp_path, assets_copy):
    recipe = assets_copy / "recipes" / "fused-pooled.yaml"
    recipe.write_text(recipe.read_text().replace("base:0-5", "base:0-4"))  # no longer what was trained
    repo = _repo(tmp_path)
    report = seed_shipped(repo, assets_copy)
    assert "fused-pooled" in report.added_recipes
    assert any("differs from the shipped fused-pooled.yaml" in s for s in report.skipped)
    assert _fused_labels(repo) == ["fused-token v1 · shipped"]
    repo.close()


def test_labels_name_every_trained_result(tmp_path):
    repo = _repo(tmp_path)
    seed_shipped(repo, ASSETS)
    v = repo.create_recipe("my-recipe", "slots: []")
    v3 = repo.save_version(repo.save_version(v.recipe_id, "slots: [a]").recipe_id, "slots: [a, b]")
    weights = tmp_path / "w.safetensors"
    shutil.copy(SHIPPED_WEIGHTS[0], weights)
    done = repo.create_training_run(v3.id, {}, status="running")
    repo.update_training_run(
        done.id, status="completed", append_loss=[{"step": i, "loss": 1.0} for i in (1, 2, 3)],
        metrics={"steps": 2000}, weights_path=str(weights),
    )  # fmt: skip
    repo.create_training_run(v3.id, {}, status="failed", weights_path=str(weights))
    repo.create_training_run(v3.id, {}, status="completed")  # no weights
    gone = repo.create_training_run(v3.id, {}, status="completed", weights_path=str(tmp_path / "gone"))

    choices = repo.trained_result_choices(v3.id)
    [(label, rid)] = choices
    assert rid == done.id and LABEL_OF_RUN.match(label), label
    finished = repo.get_training_run(done.id).finished_at
    assert label == f"my-recipe v3 · run {done.id} · 2000 steps · {finished:%Y-%m-%d %H:%M}"
    everything = repo.trained_result_choices()
    assert (label, rid) in everything and len(everything) == len(SHIPPED_WEIGHTS) + 1
    assert [lab for lab, _ in everything[: len(SHIPPED_WEIGHTS)]] == [
        r.label for r in repo.list_trained_results(shipped=True)
    ]  # shipped first
    for lab, i in everything:
        assert isinstance(i, int) and not lab.strip().isdigit() and str(i) != lab.strip()
        assert lab.startswith(
            tuple(f"{w.stem} v1 · shipped" for w in SHIPPED_WEIGHTS) + ("my-recipe v3 · run ",)
        )
    assert len({lab for lab, _ in everything}) == len(everything)
    assert repo.trained_result_choices(recipe_id=v.recipe_id) == choices
    assert gone.id in {r.id for r in repo.list_trained_results(include_missing=True)}
    assert repo.trained_result_choices(v.id) == []  # version 1 has none
    repo.close()


def test_two_shipped_results_of_one_version_get_distinct_labels(tmp_path):
    repo = _repo(tmp_path)
    two = [
        ShippedWeights(w.name, f"{i:064x}", str(w.resolve()), {}, {}, [])
        for i, w in enumerate(SHIPPED_WEIGHTS[:2])
    ]
    result = repo.seed_shipped_recipe("x", "slots: []", asset="x.yaml", sha256="0" * 64, weights=two)
    assert result.status == "seeded" and len(result.added_training_runs) == 2
    labels = [label for label, _ in repo.trained_result_choices(result.version_id)]
    assert sorted(labels) == sorted(f"x v1 · shipped · run {i}" for i in result.added_training_runs)
    again = repo.seed_shipped_recipe("x", "slots: []", asset="x.yaml", sha256="1" * 64, weights=two)
    assert again.status == "present" and again.added_training_runs == ()
    repo.close()


def test_best_shipped_fusion(tmp_path, assets_copy):
    repo = _repo(tmp_path)
    assert best_shipped_fusion(repo) is None
    seed_shipped(repo, ASSETS)
    best = best_shipped_fusion(repo)
    # the lowest recorded mixed-text perplexity, else the first preferred fusion that ships weights
    recorded = {
        w.name.removesuffix(".safetensors"): recorded_mixed_perplexity(_record(w)) for w in SHIPPED_WEIGHTS
    }
    known = {n: p for n, p in recorded.items() if p is not None}
    expected = (
        min(known, key=known.get) if known else next(n for n in SHIPPED_FUSION_PREFERENCE if n in recorded)
    )
    assert SHIPPED_FUSION_PREFERENCE[:2] == ("lanes-trio", "lanes-branches")
    assert best.version.recipe_name == expected
    assert (best.version.number, best.result.version_id) == (1, best.version.id)
    assert best.result.label == f"{expected} v1 · shipped"
    repo.close()

    # run files that record a mixed-text perplexity decide by it
    for path in (assets_copy / "weights").glob("*.train.json"):
        name = path.name.removesuffix(".train.json")
        ppl = {"fused-token": 50.80, "fused-pooled": 50.65}.get(name, 60.0 + len(name))
        record = json.loads(path.read_text())
        record["eval"] = {"perplexity": {"prose": 57.0, "code": 28.0, "mixed": ppl}}
        record.setdefault("metrics", {}).pop("mixed_perplexity", None)
        path.write_text(json.dumps(record))
        assert recorded_mixed_perplexity(record) == ppl
    repo = _repo(tmp_path, "other.db")
    seed_shipped(repo, assets_copy)
    best = best_shipped_fusion(repo)
    assert best.version.recipe_name == "fused-pooled" and best.result.run.metrics["mixed_perplexity"] == 50.65
    repo.close()


def test_recorded_mixed_perplexity_forms():
    assert recorded_mixed_perplexity({}) is None
    assert recorded_mixed_perplexity(_record(SHIPPED_WEIGHTS[0])) is None  # the shipped run files record none
    assert recorded_mixed_perplexity({"metrics": {"mixed_perplexity": 51.0}}) == 51.0
    report = {"rows": [{"kind": "source", "domains": {"mixed": {"perplexity": 57.7}}},
                       {"kind": "fused", "domains": {"mixed": {"perplexity": 50.8}}}]}  # fmt: skip
    assert recorded_mixed_perplexity({"eval": report}) == 50.8
    assert recorded_mixed_perplexity({"metrics": {"mixed_perplexity": float("nan")}}) is None


def test_name_taken_by_other(tmp_path):
    repo = _repo(tmp_path)
    a = repo.create_recipe("a", "slots: []")
    b = repo.create_recipe("b", "slots: []")
    assert repo.name_taken_by_other("a", a.recipe_id) is None  # its own name: a plain new version
    assert repo.name_taken_by_other("a", b.recipe_id).id == a.recipe_id  # would add a version to "a"
    assert repo.name_taken_by_other(" a ", None).id == a.recipe_id  # a new recipe under a taken name
    assert repo.name_taken_by_other("c", None) is None and repo.name_taken_by_other("", a.recipe_id) is None
    repo.delete_recipe(a.recipe_id)
    assert repo.name_taken_by_other("a", b.recipe_id) is None  # a deleted recipe's name is free
    assert repo.list_versions(b.recipe_id)[-1].number == 1  # asking changed nothing
    repo.close()


def test_revision_0003_upgrades_a_database_made_at_0002(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_db_engine(url)
    upgrade(engine, "0002")
    assert "shipped_assets" not in inspect(engine).get_table_names()
    with engine.begin() as conn:  # data as release 0002 wrote it, in its own SQL
        conn.execute(
            text("INSERT INTO recipes (id, name, created_at) VALUES (1, 'fused-token', '2024-05-01')")
        )
        conn.execute(
            text(
                "INSERT INTO recipe_versions (id, recipe_id, number, note, yaml_text, parent_id, created_at) "
                "VALUES (1, 1, 1, 'mine', 'slots: [bard:0]', NULL, '2024-05-01 10:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO training_runs (id, version_id, status, config, metrics, loss_curve, weights_path, "
                "created_at, updated_at, finished_at) VALUES (1, 1, 'completed', '{}', '{}', "
                f"'[{{\"step\": 1, \"loss\": 2.0}}]', '{SHIPPED_WEIGHTS[0]}', '2024-05-04 10:00:00', "
                "'2024-05-04 10:00:00', '2024-05-04 10:05:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO evaluations (version_id, training_run_id, name, results, created_at) "
                "VALUES (1, 1, 'e', '{}', '2024-05-05 10:00:00')"
            )
        )
    engine.dispose()

    repo = Repository(url)  # upgrades on open
    assert repo.schema_revision() == head_revision() == "0003"
    [old] = repo.list_training_runs()
    assert old.origin == "studio" and not old.shipped
    assert repo.trained_result_choices(1) == [("fused-token v1 · run 1 · 1 step · 2024-05-04 10:05", 1)]
    report = seed_shipped(repo, ASSETS)  # the user's "fused-token" stays theirs
    assert "fused-token" not in report.added_recipes and len(report.added_recipes) == len(SHIPPED_RECIPES) - 1
    assert [v.yaml_text for v in repo.list_versions(1)] == ["slots: [bard:0]"]
    assert len(repo.list_evaluations()) == 1

    downgrade(repo.engine, "0002")  # and back: the seeded rows go with the table, the column with them
    assert current_revision(repo.engine) == "0002"
    assert "shipped_assets" not in inspect(repo.engine).get_table_names()
    assert "origin" not in {c["name"] for c in inspect(repo.engine).get_columns("training_runs")}
    repo.close()
    repo = Repository(url)
    assert repo.schema_revision() == "0003" and repo.get_training_run(1).origin == "studio"
    assert seed_shipped(repo, ASSETS).added_recipes == ()  # seeded recipes are still there, by name
    repo.close()
