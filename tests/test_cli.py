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
    r = write_recipe(
        tmp_path,
        f"name: p\nmodels: {{a: {tiny('llama')}, b: {tiny('gpt2', width=96)}}}\n"
        "slots: [a:0, {experts: [a:1, b:1]}, a:2]\n",
    )
    assert main(["plan", r]) == 0
    out = capsys.readouterr().out
    assert "Reads" in out and "Memory estimate" in out and "OK" in out
    assert "linear adapter" in out


def test_run_generates_and_summarises_routing(tiny, tmp_path, capsys):
    r = write_recipe(
        tmp_path,
        f"name: p\nmodels: {{a: {tiny('llama')}, b: {tiny('gpt2', width=96)}}}\n"
        "slots: [a:0, {experts: [a:1, b:1]}, a:2]\n",
    )
    assert main(["run", r, "--prompt", "To be or not", "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be or not")
    assert "slot 1 (token): a:1" in out


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\nmodels: {a: no/such/folder}\nslots: [a:0]", "does not exist"),
        ("name: x\nmodels: {a: p\nslots: [a:0", "not valid YAML"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, body, message):
    r = write_recipe(tmp_path, body)
    proc = subprocess.run(
        [sys.executable, "-m", "mol.cli", "plan", r],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_missing_recipe_file_exits_2(capsys):
    assert main(["plan", "does-not-exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("folder", "is a folder, not a recipe file"),
        ("huge int", "a number of 5,000 characters"),
        ("huge layer", "stay below 100,000"),
        ("deep", "nested more than"),
        ("latin-1", "not UTF-8"),
        ("python tag", "could not determine a constructor"),
    ],
)
def test_bad_recipe_files_exit_2_with_one_line(tmp_path, case, message):
    if case == "folder":
        r = tmp_path / "recipes"
        r.mkdir()
    elif case == "latin-1":
        r = tmp_path / "r.yaml"
        r.write_bytes("name: caf\xe9\nmodels: {a: p}\nslots: [a:0]\n".encode("latin-1"))
    else:
        r = tmp_path / "r.yaml"
        r.write_text(
            {
                "huge int": "name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {top_k: "
                + "9" * 5000
                + "}}]\n",
                "huge layer": "name: x\nmodels: {a: p}\nslots: ['a:1000000000000000000000']\n",
                "deep": "[" * 3000 + "]" * 3000,
                "python tag": "name: !!python/object/apply:os.system ['echo hi']\n",
            }[case]
        )
    proc = subprocess.run(
        [sys.executable, "-m", "mol.cli", "plan", str(r)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert proc.returncode == 2, proc.stderr[-500:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and len(proc.stderr) < 400, proc.stderr[:500]


def test_recipe_from_stdin_is_text(tmp_path, monkeypatch, capsys):
    import io

    real = tmp_path / "x.yaml"
    real.write_text("name: from-the-file\nmodels: {a: p}\nslots: [a:0]\n")
    monkeypatch.setattr(
        "sys.stdin", io.StringIO(str(real))
    )  # a path on stdin is YAML text, not a file to open
    assert main(["plan", "-"]) == 2
    err = capsys.readouterr().err
    assert "A recipe is a mapping" in err and "from-the-file" not in err
