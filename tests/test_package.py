"""The package surface: functions that share a name with their module stay callable in any import order."""

import subprocess
import sys


def test_functions_named_like_their_modules_stay_callable():
    code = (
        "import mol\n"
        "mol.build\n"  # imports mol.loading, which imports the submodule mol.plan
        "import mol.train, mol.calibrate, mol.evaluate\n"
        "assert all(callable(f) for f in (mol.plan, mol.train, mol.calibrate, mol.evaluate))\n"
        "from mol.plan import Plan\n"
        "assert Plan.__name__ == 'Plan'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_importing_errors_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, mol.errors, mol.recipe; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "False", proc.stderr
