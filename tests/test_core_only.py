"""The library installs and works alone (`pip install mol-studio`, no `studio` extra): in a process where the
studio's packages cannot be imported, every module of `mol` imports, `mol plan` works and `mol db` says which
extra to install. With the extra installed, mol's own commands still import none of them."""

import subprocess
import sys
from pathlib import Path

STUDIO_PACKAGES = ("gradio", "sqlalchemy", "alembic", "plotly")
RECIPE = Path(__file__).parent.parent / "assets" / "recipes" / "plain-stack.yaml"

# A meta-path finder that makes the studio's packages absent, as in an installation without the extra.
CORE_ONLY = f"""
import importlib.abc, sys
BLOCKED = {STUDIO_PACKAGES!r}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""

IMPORT_ALL = """
import importlib, pkgutil, mol
for m in pkgutil.walk_packages(mol.__path__, "mol."):
    if not m.name.endswith("__main__"):  # runs the CLI when imported
        importlib.import_module(m.name)
"""


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "", "PYTHONPATH": str(RECIPE.parents[2])},
    )


def test_without_the_studio_extra_every_library_command_works_and_db_names_the_extra():
    proc = python(
        CORE_ONLY
        + IMPORT_ALL
        + f"""
from mol.cli import main
print("plan", main(["plan", {str(RECIPE)!r}]), flush=True)
print("db", main(["db", "check"]), flush=True)
print("help", main(["--help"]), flush=True)
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert "plan 0" in proc.stdout and "OK: the recipe is valid." in proc.stdout, proc.stdout + proc.stderr
    assert "db 2" in proc.stdout
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: `mol db` needs"), proc.stderr
    assert "pip install 'mol-studio[studio]'" in err[0] and "Traceback" not in proc.stderr
    assert "(not installed: pip install 'mol-studio[studio]')" in proc.stdout  # `mol --help` lists it so


def test_library_commands_import_nothing_from_the_studio():
    """Even where the studio is installed: `import mol`, every mol module and `mol plan` leave it unimported
    (the `mol db` plug-in is loaded only when asked for)."""
    proc = python(
        IMPORT_ALL
        + f"""
import sys
from mol.cli import main
assert main(["plan", {str(RECIPE)!r}]) == 0
assert main(["run", "--help"]) == 0
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({STUDIO_PACKAGES!r}) | {{"studio"}} & set(sys.modules)))
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
