"""`mol db backup/export/restore/check` through the real CLI entry point."""

import os
import subprocess
import sys

import pytest

from studio.db import Repository


def mol(*args, url):
    env = {**os.environ, "MANGO_DB_URL": url, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mol.cli", "db", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture
def filled(tmp_path):
    url = f"sqlite:///{tmp_path / 'studio.db'}"
    repo = Repository(url)
    v = repo.create_recipe("keep me", "name: keep\nmodels: {a: x}\nslots: [a:0]\n", note="first")
    repo.save_version(v.recipe_id, "name: keep\nmodels: {a: x}\nslots: [a:0, a:1]\n", note="second")
    repo.close()
    return url


def test_backup_then_restore_brings_everything_back(filled, tmp_path):
    backup = tmp_path / "backup.db"
    assert mol("backup", str(backup), url=filled).returncode == 0
    repo = Repository(filled)
    repo.delete_recipe(repo.find_recipe("keep me").id)
    repo.create_recipe("later", "name: later\nmodels: {a: x}\nslots: [a:0]\n")
    repo.close()
    proc = mol("restore", str(backup), url=filled)
    assert proc.returncode == 0, proc.stderr
    repo = Repository(filled)
    names = [r.name for r in repo.list_recipes()]
    assert names == ["keep me"]
    assert [v.note for v in repo.list_versions(repo.find_recipe("keep me").id)] == ["first", "second"]
    repo.close()


def test_export_writes_json_and_check_reports_integrity(filled, tmp_path):
    out = tmp_path / "all.json"
    assert mol("export", str(out), url=filled).returncode == 0
    assert "keep me" in out.read_text()
    proc = mol("check", url=filled)
    assert proc.returncode == 0 and "integrity: ok" in proc.stdout and "recipes: 1" in proc.stdout


def test_restore_of_a_junk_file_is_a_clear_error(filled, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database")
    proc = mol("restore", str(junk), url=filled)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


def test_a_db_command_loads_neither_torch_nor_mols_own_commands(filled):
    """`mol db` is a plug-in's command: the parser loads that plug-in alone, not the modules behind mol's own
    commands (torch and transformers: seconds of imports for a database check)."""
    code = (
        "import sys\nfrom mol.cli import main\nrc = main(['db', 'check'])\n"
        "print(rc, [m for m in ('torch', 'transformers', 'mol.commands.train') if m in sys.modules])"
    )
    env = {**os.environ, "MANGO_DB_URL": filled, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout
