"""The package surface: no function shares its name with a module, so the functions stay callable in any import
order without any trick in `mol/__init__`."""

import subprocess
import sys


def test_functions_stay_callable_in_any_import_order():
    code = (
        "import mol\n"
        "mol.build\n"  # imports mol.loading, which imports mol.planning
        "import mol.training, mol.calibration, mol.evaluation\n"
        "assert all(callable(f) for f in (mol.plan, mol.train, mol.calibrate, mol.evaluate))\n"
        "from mol.planning import Plan\n"
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
