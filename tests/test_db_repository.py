"""Repository behaviour: versions are append-only, deletes are soft, names unique among live recipes, runs /
training runs / evaluations linked to versions, whole-database backup, export and restore."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from mol.errors import ConflictError, MolError, StorageError
from studio.db import (
    DuplicateNameError,
    InputTooLongError,
    NotFoundError,
    Repository,
    VersionConflictError,
    diff_yaml,
    get_repository,
    head_revision,
)

RECIPE_V1 = """\
name: prose-code
base: bard
models: {bard: assets/models/mango-bard, coder: assets/models/mango-coder}
slots:
  - experts: ["bard:0"]
  - experts: ["bard:1", "coder:1"]
    router: {type: token, top_k: 1}
  - experts: ["bard:2"]
"""

RECIPE_V2 = """\
name: prose-code
base: bard
models: {bard: assets/models/mango-bard, coder: assets/models/mango-coder-v2}
adapter: {type: linear}
slots:
  - experts: ["bard:0"]
  - experts: ["coder:0"]
  - experts: ["bard:1", "coder:1"]
    router: {type: token, top_k: 2}
"""


@pytest.fixture
def repo(tmp_path):
    r = Repository(f"sqlite:///{tmp_path / 'mango.db'}")
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------- versions


def test_create_recipe_makes_version_one(repo):
    v1 = repo.create_recipe("prose-code", RECIPE_V1, note="first try")
    assert (v1.number, v1.note, v1.yaml_text, v1.parent_id) == (1, "first try", RECIPE_V1, None)
    assert v1.created_at.tzinfo is not None
    [info] = repo.list_recipes()
    assert (info.id, info.name, info.latest_version, info.latest_note, info.deleted) == (
        v1.recipe_id,
        "prose-code",
        1,
        "first try",
        False,
    )
    assert repo.find_recipe("prose-code") == info
    assert repo.find_recipe("nope") is None


def test_edits_append_versions_and_never_overwrite(repo):
    v1 = repo.create_recipe("r", RECIPE_V1)
    v2 = repo.save_version(v1.recipe_id, RECIPE_V2, note="swap coder", parent_version=1)
    v3 = repo.save_version(v1.recipe_id, RECIPE_V2 + "# comment\n")  # no parent given: on top of the latest
    assert [v.number for v in (v1, v2, v3)] == [1, 2, 3]
    assert (v2.parent_id, v3.parent_id) == (v1.id, v2.id)
    versions = repo.list_versions(v1.recipe_id)
    assert [(v.number, v.note) for v in versions] == [(1, ""), (2, "swap coder"), (3, "")]
    assert repo.get_version(v1.recipe_id, 1).yaml_text == RECIPE_V1  # untouched
    assert repo.get_version(v1.recipe_id).number == 3
    assert repo.get_version_by_id(v2.id) == v2
    assert repo.get_recipe(v1.recipe_id).latest_version == 3
    with pytest.raises(NotFoundError):
        repo.get_version(v1.recipe_id, 9)


def test_stale_edit_is_kept_and_reported_as_conflict(repo):
    v1 = repo.create_recipe("r", RECIPE_V1)
    repo.save_version(v1.recipe_id, RECIPE_V2, note="tab A", parent_version=1)
    with pytest.raises(ConflictError) as info:  # tab B still shows version 1
        repo.save_version(v1.recipe_id, RECIPE_V1 + "# tab B\n", note="tab B", parent_version=1)
    err = info.value
    assert isinstance(err, VersionConflictError) and isinstance(err, StorageError)
    assert (err.version, err.based_on, err.latest, err.recipe_id) == (3, 1, 2, v1.recipe_id)
    versions = repo.list_versions(v1.recipe_id)
    assert [(v.number, v.note) for v in versions] == [(1, ""), (2, "tab A"), (3, "tab B")]
    assert versions[2].id == err.version_id and versions[2].parent_id == v1.id
    assert "version 2" in str(err) and "version 3" in str(err)
    # once the editor has caught up, saving on top of the latest is quiet again
    assert repo.save_version(v1.recipe_id, RECIPE_V2, parent_version=3).number == 4


def test_conflict_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(VersionConflictError(1, 3, 7, 1, 2)))
    assert (err.recipe_id, err.version, err.version_id, err.based_on, err.latest) == (1, 3, 7, 1, 2)


def test_unknown_ids_raise_not_found(repo):
    with pytest.raises(NotFoundError):
        repo.save_version(42, RECIPE_V1)
    with pytest.raises(NotFoundError):
        repo.get_recipe(42)
    with pytest.raises(NotFoundError):
        repo.add_run(42, "hello")
    with pytest.raises(NotFoundError):
        repo.get_run(42)
    with pytest.raises(NotFoundError):
        repo.list_versions(42)
    v1 = repo.create_recipe("r", RECIPE_V1)
    with pytest.raises(NotFoundError):
        repo.save_version(v1.recipe_id, RECIPE_V2, parent_version=5)


# ---------------------------------------------------------------------------------------------- names, limits


def test_duplicate_names_are_refused_among_live_recipes(repo):
    repo.create_recipe("prose-code", RECIPE_V1)
    with pytest.raises(DuplicateNameError) as info:
        repo.create_recipe("  prose-code ", RECIPE_V2)  # surrounding spaces do not make a new name
    assert isinstance(info.value, StorageError) and "prose-code" in str(info.value)
    assert len(repo.list_recipes()) == 1


def test_limits_are_typed_errors(repo):
    with pytest.raises(InputTooLongError):
        repo.create_recipe("x" * 201, RECIPE_V1)
    assert repo.create_recipe("x" * 200, RECIPE_V1).number == 1
    with pytest.raises(InputTooLongError):
        repo.create_recipe("n", RECIPE_V1, note="y" * 2001)
    big = "a: '" + "z" * (1 << 20) + "'\n"
    with pytest.raises(InputTooLongError):
        repo.create_recipe("big", big)
    with pytest.raises(InputTooLongError):  # the limit is in bytes: 600k three-byte characters are too many
        repo.create_recipe("big", "é" * 600_000)
    with pytest.raises(StorageError):
        repo.create_recipe("   ", RECIPE_V1)
    with pytest.raises(MolError):
        repo.create_recipe("n", None)  # type: ignore[arg-type]
    assert [r.name for r in repo.list_recipes()] == ["x" * 200]


def test_rename(repo):
    a = repo.create_recipe("a", RECIPE_V1)
    repo.create_recipe("b", RECIPE_V1)
    assert repo.rename_recipe(a.recipe_id, "c").name == "c"
    with pytest.raises(DuplicateNameError):
        repo.rename_recipe(a.recipe_id, "b")


# ---------------------------------------------------------------------------------------------- delete, duplicate


def test_soft_delete_and_restore(repo):
    v1 = repo.create_recipe("prose-code", RECIPE_V1)
    repo.save_version(v1.recipe_id, RECIPE_V2)
    run = repo.add_run(v1.id, "Hello")
    deleted = repo.delete_recipe(v1.recipe_id)
    assert deleted.deleted and deleted.latest_version == 2
    assert repo.list_recipes() == [] and [r.id for r in repo.list_recipes(deleted=True)] == [v1.recipe_id]
    assert len(repo.list_recipes(deleted=None)) == 1
    assert repo.find_recipe("prose-code") is None
    assert len(repo.list_versions(v1.recipe_id)) == 2 and repo.get_run(run.id).prompt == "Hello"
    with pytest.raises(StorageError):
        repo.save_version(v1.recipe_id, RECIPE_V1)

    # the name is free again; restoring then needs another name
    other = repo.create_recipe("prose-code", RECIPE_V1)
    with pytest.raises(DuplicateNameError):
        repo.restore_recipe(v1.recipe_id)
    restored = repo.restore_recipe(v1.recipe_id, new_name="prose-code (old)")
    assert not restored.deleted and restored.name == "prose-code (old)" and restored.latest_version == 2
    assert {r.id for r in repo.list_recipes()} == {v1.recipe_id, other.recipe_id}
    assert repo.restore_recipe(v1.recipe_id).name == "prose-code (old)"  # restoring a live recipe: no-op


def test_duplicate_copies_a_version(repo):
    v1 = repo.create_recipe("prose-code", RECIPE_V1)
    v2 = repo.save_version(v1.recipe_id, RECIPE_V2)
    copy = repo.duplicate_recipe(v1.id)
    assert (copy.recipe_name, copy.number, copy.yaml_text, copy.parent_id) == (
        "prose-code (copy)",
        1,
        RECIPE_V1,
        v1.id,
    )
    assert "prose-code" in copy.note and "version 1" in copy.note
    assert repo.duplicate_recipe(v2.id).recipe_name == "prose-code (copy 2)"
    named = repo.duplicate_recipe(v2.id, "experiment", note="try top-2")
    assert (named.recipe_name, named.note, named.yaml_text) == ("experiment", "try top-2", RECIPE_V2)
    with pytest.raises(DuplicateNameError):
        repo.duplicate_recipe(v2.id, "experiment")
    with pytest.raises(NotFoundError):
        repo.duplicate_recipe(999)
    assert len(repo.list_versions(v1.recipe_id)) == 2  # the source is untouched


# ---------------------------------------------------------------------------------------------- compare


def test_compare_versions_reports_keys_slots_and_text(repo):
    v1 = repo.create_recipe("r", RECIPE_V1)
    v2 = repo.save_version(v1.recipe_id, RECIPE_V2)
    cmp = repo.compare_versions(v1.id, v2.id)
    assert (cmp.old.number, cmp.new.number) == (1, 2) and not cmp.identical
    d = cmp.diff
    changes = {c.path: (c.kind, c.old, c.new) for c in d.changes}
    assert changes == {
        "models.coder": ("changed", "assets/models/mango-coder", "assets/models/mango-coder-v2"),
        "adapter.type": ("added", None, "linear"),
    }
    assert set(d.changed_keys) == {"models", "adapter", "slots"}
    kinds = [(s.kind, s.old_index, s.new_index) for s in d.slots]
    # slot 1 was inserted, the routed slot changed top_k, the last plain slot was removed
    assert ("added", None, 1) in kinds and ("removed", 2, None) in kinds
    routed = next(s for s in d.slots if s.kind == "changed")
    assert [(f.path, f.old, f.new) for f in routed.fields] == [("router.top_k", 1, 2)]
    assert d.text_diff.startswith("--- r v1\n+++ r v2\n")
    assert "-models: {bard: assets/models/mango-bard, coder: assets/models/mango-coder}" in d.text_diff
    assert repo.compare_versions(v1.id, v1.id).identical


def test_diff_of_unparseable_yaml_still_gives_text():
    d = diff_yaml("a: [1, 2\n", "a: 1\n")
    assert d.parse_error and "-a: [1, 2" in d.text_diff and not d.changes


def test_diff_slot_shorthands_and_lists():
    d = diff_yaml("slots: [bard:0-3, bard:4]\n", "slots: [bard:0-3, [bard:4, coder:4]]\n")
    [change] = d.slots
    assert change.kind == "changed" and change.old == "bard:4" and change.new == ["bard:4", "coder:4"]


# ---------------------------------------------------------------------------------------------- runs etc.


TRACE = {
    "tokens": ["Hi", " there"],
    "token_ids": [5, 6],
    "slots": [
        {
            "slot": 1,
            "router": "token",
            "experts": ["bard:1", "coder:1"],
            "probs": [[0.7, 0.3], [0.2, 0.8]],
            "chosen": [[0], [1]],
            "load": [0.5, 0.5],
        }
    ],
}


def test_runs_are_listed_and_opened(repo):
    a1 = repo.create_recipe("a", RECIPE_V1)
    a2 = repo.save_version(a1.recipe_id, RECIPE_V2)
    b1 = repo.create_recipe("b", RECIPE_V1)
    r1 = repo.add_run(
        a1.id, "Once upon", "a time", settings={"max_new_tokens": 8, "temperature": 0.0}, trace=TRACE
    )
    r2 = repo.add_run(a2.id, "Prompt ✓ ünïcode", "out")
    r3 = repo.add_run(b1.id, "other")
    assert [r.id for r in repo.list_runs()] == [r3.id, r2.id, r1.id]  # newest first
    assert [r.id for r in repo.list_runs(recipe_id=a1.recipe_id)] == [r2.id, r1.id]
    assert [r.id for r in repo.list_runs(version_id=a1.id)] == [r1.id]
    assert [r.id for r in repo.list_runs(limit=1, offset=1)] == [r2.id]
    listed = repo.list_runs(version_id=a1.id)[0]
    assert listed.trace is None and listed.settings == {"max_new_tokens": 8, "temperature": 0.0}
    opened = repo.get_run(r1.id)
    assert opened.trace == TRACE and opened.output_text == "a time"
    assert (opened.recipe_name, opened.version_number, opened.recipe_id) == ("a", 1, a1.recipe_id)
    assert repo.get_run(r2.id).prompt == "Prompt ✓ ünïcode"
    repo.delete_recipe(b1.recipe_id)  # runs of a deleted recipe leave the history, but are kept
    assert [r.id for r in repo.list_runs()] == [r2.id, r1.id]
    assert [r.id for r in repo.list_runs(include_deleted=True)] == [r3.id, r2.id, r1.id]
    assert [r.id for r in repo.list_runs(recipe_id=b1.recipe_id)] == [r3.id]
    with pytest.raises(StorageError):
        repo.add_run(a1.id, "x", settings={"bad": object()})


def test_training_runs_and_evaluations(repo):
    v1 = repo.create_recipe("r", RECIPE_V1)
    v2 = repo.save_version(v1.recipe_id, RECIPE_V2)
    t = repo.create_training_run(v2.id, {"steps": 100, "lr": 1e-3})
    assert (t.status, t.loss_curve, t.finished_at, t.version_number) == ("pending", [], None, 2)
    t = repo.update_training_run(t.id, status="running", append_loss=[{"step": 1, "loss": 3.2}])
    t = repo.update_training_run(
        t.id, append_loss=[{"step": 2, "loss": 2.9, "lr": 1e-3}], metrics={"tok_s": 10}
    )
    t = repo.update_training_run(
        t.id, status="completed", weights_path="runs/r/router.safetensors", metrics={"final_loss": 2.9}
    )
    assert t.loss_curve == [{"step": 1, "loss": 3.2}, {"step": 2, "loss": 2.9, "lr": 1e-3}]
    assert t.metrics == {"tok_s": 10, "final_loss": 2.9} and t.finished_at is not None
    assert t.weights_path == "runs/r/router.safetensors" and t.config == {"steps": 100, "lr": 1e-3}
    with pytest.raises(StorageError):
        repo.update_training_run(t.id, status="exploded")
    assert [x.id for x in repo.list_training_runs(recipe_id=v1.recipe_id)] == [t.id]
    assert repo.list_training_runs(version_id=v1.id) == []

    e1 = repo.add_evaluation(v1.id, {"ppl": 12.5}, name="baseline")
    e2 = repo.add_evaluation(v2.id, {"ppl": 10.1}, training_run_id=t.id)
    with pytest.raises(StorageError):  # a training run of another version
        repo.add_evaluation(v1.id, {"ppl": 1.0}, training_run_id=t.id)
    assert repo.get_evaluation(e2.id).training_run_id == t.id
    assert [e.id for e in repo.list_evaluations(recipe_id=v1.recipe_id)] == [e2.id, e1.id]
    assert [e.id for e in repo.list_evaluations(training_run_id=t.id)] == [e2.id]
    assert repo.list_evaluations(version_id=v1.id)[0].results == {"ppl": 12.5}


def test_many_first_starts_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    opened: list[Repository] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(Repository(url))  # each one migrates the same empty file
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 6
    assert {r.schema_revision() for r in opened} == {head_revision()}
    opened[0].create_recipe("r", RECIPE_V1)
    assert opened[-1].find_recipe("r") is not None
    for r in opened:
        r.close()


def test_threads_can_share_a_repository(repo):
    v1 = repo.create_recipe("r", RECIPE_V1)
    errors: list[BaseException] = []

    def read():
        try:
            for _ in range(20):
                repo.list_recipes()
                repo.list_versions(v1.recipe_id)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        repo.save_version(v1.recipe_id, RECIPE_V1 + f"# {i}\n")
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------------------------------------- whole database


def _fill(repo):
    v1 = repo.create_recipe("prose-code", RECIPE_V1, note="first")
    v2 = repo.save_version(v1.recipe_id, RECIPE_V2, note="second")
    dup = repo.duplicate_recipe(v2.id)
    repo.delete_recipe(dup.recipe_id)
    repo.add_run(v2.id, "Once", "upon", settings={"seed": 1}, trace=TRACE)
    t = repo.create_training_run(v2.id, {"steps": 2})
    repo.update_training_run(t.id, status="completed", loss_curve=[{"step": 1, "loss": 1.5}])
    repo.add_evaluation(v2.id, {"ppl": 3.0}, training_run_id=t.id)
    return v1.recipe_id


def _snapshot(repo):
    recipes = repo.list_recipes(deleted=None)
    return (
        recipes,
        [repo.list_versions(r.id) for r in recipes],
        [repo.get_run(r.id) for r in repo.list_runs()],
        repo.list_training_runs(),
        repo.list_evaluations(),
    )


def test_backup_and_restore_sqlite(repo, tmp_path):
    _fill(repo)
    before = _snapshot(repo)
    path = repo.backup(tmp_path / "backups" / "b.db")
    with sqlite3.connect(path) as conn:  # a plain, self-contained SQLite file
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM recipe_versions").fetchone()[0] == 3
    assert not (tmp_path / "backups" / "b.db-wal").exists()
    with pytest.raises(StorageError):
        repo.backup(path)  # never silently overwritten
    repo.create_recipe("made later", RECIPE_V1)
    safety = repo.restore(path)
    assert _snapshot(repo) == before
    assert safety is not None and safety.exists()  # what the restore replaced is kept too
    assert repo.restore(safety) is not None and repo.find_recipe("made later") is not None


def test_export_json_and_restore_from_it(repo, tmp_path):
    _fill(repo)
    before = _snapshot(repo)
    path = repo.export_json(tmp_path / "export.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "mango-export" and data["schema_revision"] == repo.schema_revision()
    assert {len(data["tables"][t]) for t in ("recipes", "recipe_versions")} == {2, 3}
    assert data["tables"]["runs"][0]["trace"] == TRACE
    repo.create_recipe("made later", RECIPE_V1)
    repo.restore(path)
    assert _snapshot(repo) == before
    assert repo.integrity_check() == "ok"
    # a fresh database can be filled from the export too
    other = Repository(f"sqlite:///{tmp_path / 'other.db'}")
    assert other.restore(path) is not None
    assert _snapshot(other) == before
    other.close()


def test_restore_refuses_junk_and_changes_nothing(repo, tmp_path):
    rid = _fill(repo)
    before = _snapshot(repo)
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    with pytest.raises(StorageError):
        repo.restore(junk)
    with pytest.raises(NotFoundError):
        repo.restore(tmp_path / "missing.db")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StorageError):
        repo.restore(foreign)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mango-export", "tables": {"recipes": [{"id": 1}]}}))
    with pytest.raises(StorageError):  # rows missing required columns: rolled back
        repo.restore(bad)
    assert _snapshot(repo) == before and repo.get_recipe(rid).name == "prose-code"


def test_in_memory_database_and_process_wide_repository(tmp_path, monkeypatch):
    mem = Repository("sqlite://")
    v = mem.create_recipe("m", RECIPE_V1)
    assert mem.get_version(v.recipe_id).yaml_text == RECIPE_V1
    with pytest.raises(StorageError):
        mem.backup(tmp_path / "x.db")
    mem.close()

    monkeypatch.setenv("MANGO_DB_URL", f"sqlite:///{tmp_path / 'env.db'}")
    repo = get_repository()
    assert repo is get_repository() and (tmp_path / "env.db").exists()
    repo.close()
