"""Schema management: migrations run on start from any working folder, the ORM matches the head revision, and an
older database upgrades with its data intact (and a copy of it kept)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from studio.db import Repository, create_db_engine, default_data_dir, head_revision, resolve_url, upgrade
from studio.db.engine import current_revision, downgrade
from studio.db.models import Base

ROOT = Path(__file__).resolve().parent.parent


def test_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MANGO_DB_URL", raising=False)
    monkeypatch.setenv("MANGO_DATA_DIR", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data"
    assert resolve_url() == f"sqlite:///{tmp_path / 'data' / 'mango.db'}"
    repo = Repository()  # creates the data folder
    assert (tmp_path / "data" / "mango.db").is_file()
    repo.close()
    monkeypatch.setenv("MANGO_DB_URL", "sqlite:///elsewhere.db")
    assert resolve_url() == "sqlite:///elsewhere.db"
    assert resolve_url("sqlite:///given.db") == "sqlite:///given.db"
    monkeypatch.delenv("MANGO_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "mango"


def test_connection_settings(tmp_path):
    repo = Repository(f"sqlite:///{tmp_path / 'm.db'}")
    with repo.engine.connect() as conn:
        pragma = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
        }
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10000, "synchronous": 2}
    assert repo.schema_revision() == head_revision() == "0003"
    repo.close()


def test_models_match_head_migration(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"ORM models and migrations disagree; add a migration: {diff}"
    engine.dispose()


def test_upgrade_older_database_keeps_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_db_engine(url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert "evaluations" not in inspect(engine).get_table_names()
    with engine.begin() as conn:  # data written by the first release, in its own SQL
        conn.execute(
            text("INSERT INTO recipes (id, name, created_at) VALUES (1, 'old', '2024-05-01 10:00:00')")
        )
        conn.execute(
            text(
                "INSERT INTO recipe_versions (id, recipe_id, number, note, yaml_text, parent_id, created_at) VALUES "
                "(1, 1, 1, 'v1', 'slots: [bard:0]', NULL, '2024-05-01 10:00:00'), "
                "(2, 1, 2, 'v2', 'slots: [bard:0, bard:1]', 1, '2024-05-02 10:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO runs (version_id, prompt, settings, output_text, trace, created_at) VALUES "
                "(2, 'hello', '{\"seed\": 3}', 'world', '{\"tokens\": [\"hello\"]}', '2024-05-03 10:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO training_runs (id, version_id, status, config, metrics, loss_curve, created_at, updated_at) "
                "VALUES (1, 2, 'completed', '{}', '{}', '[{\"step\": 1, \"loss\": 2.0}]', '2024-05-04 10:00:00', "
                "'2024-05-04 10:00:00')"
            )
        )
    engine.dispose()

    repo = Repository(url)  # upgrades to head on open
    assert repo.schema_revision() == head_revision()
    [recipe] = repo.list_recipes()
    assert (recipe.name, recipe.latest_version, recipe.created_at.year) == ("old", 2, 2024)
    versions = repo.list_versions(recipe.id)
    assert [(v.number, v.note, v.yaml_text, v.parent_id) for v in versions] == [
        (1, "v1", "slots: [bard:0]", None),
        (2, "v2", "slots: [bard:0, bard:1]", 1),
    ]
    [run] = repo.list_runs()
    assert repo.get_run(run.id).trace == {"tokens": ["hello"]} and run.settings == {"seed": 3}
    [training] = repo.list_training_runs()
    assert training.loss_curve == [{"step": 1, "loss": 2.0}]
    # what revision 0002 added works on the upgraded file
    assert repo.add_evaluation(2, {"ppl": 9.0}, training_run_id=1).results == {"ppl": 9.0}
    assert repo.save_version(recipe.id, "slots: [bard:1]").number == 3
    # the pre-upgrade file was kept
    [kept] = list(tmp_path.glob(f"old.db.pre-{head_revision()}-*.bak"))
    eng = create_db_engine(f"sqlite:///{kept}")
    assert current_revision(eng) == "0001"
    eng.dispose()
    repo.close()


def test_upgrade_is_idempotent_and_downgrade_works(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    Repository(url).close()
    repo = Repository(url)  # second start: nothing to do, no backup made
    assert not list(tmp_path.glob("*.bak"))
    repo.create_recipe("r", "slots: []")
    downgrade(repo.engine, "0001")
    assert "evaluations" not in inspect(repo.engine).get_table_names()
    assert len(list(tmp_path.glob("m.db.pre-0001-*.bak"))) == 1
    repo.close()
    repo = Repository(url)
    assert repo.find_recipe("r") is not None
    repo.close()


@pytest.mark.parametrize("how", ["code", "alembic.ini"])
def test_migrations_run_from_any_working_folder(tmp_path, how):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MANGO_DB_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    if how == "code":
        cmd = [
            sys.executable,
            "-c",
            "from studio.db import Repository; print(Repository().schema_revision())",
        ]
    else:
        cmd = [sys.executable, "-m", "alembic", "-c", str(ROOT / "studio" / "alembic.ini"), "upgrade", "head"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    engine = create_db_engine(env["MANGO_DB_URL"])
    assert current_revision(engine) == head_revision()
    engine.dispose()
