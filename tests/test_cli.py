"""The `mol` CLI: cards, plans, generation; user errors exit 2 with one line and no traceback."""

import subprocess
import sys

import pytest

from mol.cli import main


def write_recipe(tmp_path, body):
    f = tmp_path / "r.yaml"
    f.write_text(body)
    return str(f)


def test_inspect_prints_the_card(tiny, capsys):
    assert main(["inspect", str(tiny("gpt2", width=96))]) == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "96" in out and "layers" in out and "tokenizer" in out


def test_plan_prints_reads_and_memory(tiny, tmp_path, capsys):
    r = write_recipe(tmp_path, f"name: p\nmodels: {{a: {tiny('llama')}, b: {tiny('gpt2', width=96)}}}\n"
                               "slots: [a:0, {experts: [a:1, b:1]}, a:2]\n")
    assert main(["plan", r]) == 0
    out = capsys.readouterr().out
    assert "Reads" in out and "Memory estimate" in out and "OK" in out
    assert "linear adapter" in out


def test_run_generates_and_summarises_routing(tiny, tmp_path, capsys):
    r = write_recipe(tmp_path, f"name: p\nmodels: {{a: {tiny('llama')}, b: {tiny('gpt2', width=96)}}}\n"
                               "slots: [a:0, {experts: [a:1, b:1]}, a:2]\n")
    assert main(["run", r, "--prompt", "To be or not", "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be or not")
    assert "slot 1 (token): a:1" in out


@pytest.mark.parametrize("body, message", [
    ("name: x\nmodels: {a: no/such/folder}\nslots: [a:0]", "does not exist"),
    ("name: x\nmodels: {a: p\nslots: [a:0", "not valid YAML"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, body, message):
    r = write_recipe(tmp_path, body)
    proc = subprocess.run([sys.executable, "-m", "mol.cli", "plan", r], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_missing_recipe_file_exits_2(capsys):
    assert main(["plan", "does-not-exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
