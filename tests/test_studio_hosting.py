"""Hosting: `python app.py` serves the studio offline, requirements.txt matches the package's dependencies, the
`spaces` GPU decorator is used when present, and the Space front matter (when the README has it) matches the
Gradio in use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio
import pytest

from tests.studio_server import free_port, make_models_dir

REPO = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    return {
        re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
        for r in requirements
        if r.strip() and not r.strip().startswith("#")
    }


def test_requirements_match_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["studio"])
    listed = _names((REPO / "requirements.txt").read_text().splitlines())
    assert listed == wanted - {"gradio"}  # the Space installs Gradio from sdk_version


def test_space_front_matter_matches_gradio():
    text = (REPO / "README.md").read_text(encoding="utf-8") if (REPO / "README.md").is_file() else ""
    if not text.startswith("---\n"):
        pytest.skip("README.md has no Space front matter yet")
    import yaml

    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert str(meta["sdk_version"]) == gradio.__version__


@pytest.mark.parametrize("with_spaces", [False, True])
def test_gpu_decorator_when_spaces_is_installed(tmp_path, with_spaces):
    if with_spaces:
        (tmp_path / "spaces.py").write_text("def GPU(fn):\n    fn.on_gpu = True\n    return fn\n")
    code = "import studio.engine as e\nf = e.gpu_task(lambda: 1)\nprint(getattr(f, 'on_gpu', False))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(with_spaces)


def test_python_app_py_serves_the_studio_offline(tmp_path, tiny):
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_SERVER_PORT": str(port),
        "MANGO_DB_URL": f"sqlite:///{tmp_path / 'app.db'}",
        "MANGO_MODELS_DIR": str(make_models_dir(tmp_path / "models", tiny)),
    }
    proc = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    config = r.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"app.py did not start:\n{proc.stdout.read() if proc.stdout else ''}"
                    ) from None
                time.sleep(0.5)
        for elem_id in (
            "model-list",
            "layer-palette",
            "recipe-board",
            "recipe-name",
            "save-recipe",
            "recipe-versions",
            "plan-status",
            "prompt",
            "run-prompt",
            "output-text",
            "router-heatmap",
            "expert-load",
            "runs-list",
        ):
            assert f'"elem_id": "{elem_id}"' in config or f'"elem_id":"{elem_id}"' in config, elem_id
        assert "mango-bard" in config  # opens on the embedded models
        assert (tmp_path / "app.db").is_file()  # migrations ran at start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
