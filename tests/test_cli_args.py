"""Hostile command-line arguments: every one ends in exit status 2 and a single `error:` line, never a traceback
(nor a crash deep inside torch, nor a run that trains for an hour and then fails to save)."""

import os

import pytest
import torch

from mol.cli import main
from tests.tiny_models import CORPUS

GPUS = torch.cuda.device_count()
NO_GPU = pytest.mark.skipif(GPUS > 0, reason="a GPU is visible here")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-args")
    (d / "r.yaml").write_text(
        f"name: r\nmodels: {{a: {tiny('llama')}, b: {tiny('gpt2', width=96)}}}\n"
        "slots: [a:0, {experts: [a:1, b:1]}, a:2]\n"
    )
    (d / "text.txt").write_text(CORPUS)
    (d / "random.bin").write_bytes(os.urandom(4096) + b"\xff\xfe")  # not UTF-8
    (d / "nul.txt").write_bytes(b"abc\x00def" * 200)  # valid UTF-8, but binary
    (d / "empty").mkdir()
    (d / "binary-only").mkdir()
    (d / "binary-only" / "a.txt").write_bytes(os.urandom(512) + b"\xff")
    (d / "plain-file").write_text("x")
    return d


def base(cmd, d, out):
    return {
        "run": ["run", f"{d}/r.yaml", "--prompt", "To be", "-n", "2", "--device", "cpu"],
        "train": [
            "train",
            f"{d}/r.yaml",
            "--data",
            f"p={d}/text.txt",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--seq-len",
            "8",
            "--no-progress",
            "--out",
            f"{out}/w.safetensors",
            "--device",
            "cpu",
        ],
        "eval": [
            "eval",
            f"{d}/r.yaml",
            "--data",
            f"p={d}/text.txt",
            "--no-sources",
            "--seq-len",
            "8",
            "--max-tokens",
            "64",
            "--out",
            f"{out}/e",
            "--device",
            "cpu",
        ],
        "calibrate": [
            "calibrate",
            f"{d}/r.yaml",
            "--text",
            f"{d}/text.txt",
            "--tokens",
            "64",
            "--out",
            f"{out}/c.safetensors",
            "--device",
            "cpu",
        ],
        "export": ["export", f"{d}/r.yaml", f"{out}/x"],
    }[cmd]


def with_options(argv, extra):
    """`argv` with each option in `extra` replacing the same option (and its value) already there."""
    argv = list(argv)
    for i, opt in enumerate(extra):
        if opt.startswith("-") and opt in argv and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            j = argv.index(opt)
            del argv[j : j + 2]
    return argv + extra


DEVICES = [
    ["--device", "nonsense"],
    ["--device", "meta"],
    ["--device", ""],
    ["--device", f"cuda:{GPUS}"],
    ["--device", "cuda:-1"],
    pytest.param(["--device", "cuda"], marks=NO_GPU),
]
if GPUS <= 7:
    DEVICES.append(["--device", "cuda:7"])
DATA = [
    ["--data", "p={d}/missing.txt"],
    ["--data", "p={d}/random.bin"],
    ["--data", "p={d}/nul.txt"],
    ["--data", "p={d}/empty"],
    ["--data", "p={d}/binary-only"],
    ["--data", "p={d}"],
    ["--data", "=oops"],
]
OUTPUTS = [["--out", "{d}/plain-file/w.safetensors"], ["--out", "{d}/empty"]]

CASES = {
    "run": [
        ["--prompt", ""],
        *DEVICES,
        ["--seed", str(2**64)],
        ["--seed", "-1"],
        ["--seed", "abc"],
        ["--sample", "--temperature", "nan"],
        ["--sample", "--temperature", "inf"],
        ["--sample", "--temperature", "-1"],
        ["--sample", "--temperature", "0"],
        ["--sample", "--top-p", "0"],
        ["--sample", "--top-p", "1.5"],
        ["--sample", "--top-p", "nan"],
        ["-n", str(10**30)],
        ["-n", "0"],
        ["-n", "1e3"],
        ["--prompt", "to be " * 2000],
        ["--prompt", "hi", "-n", "4096"],
        ["--weights", "{d}/random.bin"],
        ["--weights", "{d}/empty"],
        ["--weights", "{d}/missing"],
    ],
    "train": [
        ["--batch-size", "0"],
        ["--batch-size", str(2**40)],
        ["--steps", "-1"],
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--lr", "-1"],
        ["--lr", "0"],
        ["--router-lr", "nan"],
        ["--seq-len", "0"],
        ["--seq-len", "1"],
        ["--seq-len", "100000"],
        ["--grad-accum", "0"],
        ["--seed", "-1"],
        ["--seed", str(2**64)],
        ["--warmup", "-5"],
        ["--weight-decay", "nan"],
        ["--mixed-share", "2"],
        ["--aux-loss-weight", "-1"],
        ["--max-seconds", "nan"],
        ["--max-seconds", "0"],
        ["--max-tokens", "0"],
        ["--save-every", "-1"],
        ["--init-tokens", "0"],
        *DEVICES,
        *DATA,
        *OUTPUTS,
    ],
    "eval": [
        ["--batch-size", "0"],
        ["--seq-len", "0"],
        ["--seq-len", "100000"],
        ["--max-tokens", "-1"],
        ["--weights", "{d}/random.bin"],
        *DEVICES,
        *DATA,
        ["--out", "{d}/plain-file/e"],
        ["--out", "{d}/empty"],
    ],
    "calibrate": [
        ["--tokens", "0"],
        ["--tokens", "-5"],
        ["--text", "{d}/missing.txt"],
        ["--text", "{d}/random.bin"],
        ["--text", "{d}/nul.txt"],
        ["--text", "{d}/empty"],
        ["--text", "{d}/binary-only"],
        *DEVICES,
        *OUTPUTS,
    ],
    "export": [
        ["--shard-size", "inf"],
        ["--shard-size", "0"],
        ["--max-size", "nan"],
        ["--max-size", "-1"],
        ["--dtype", "float8"],
        ["--format", "gguf"],
        ["--eval-json", "{d}/random.bin"],
        ["--weights", "{d}/nul.txt"],
    ],
}
PARAMS = []
for cmd, cases in CASES.items():
    for extra in cases:
        marks = extra.marks if hasattr(extra, "marks") else ()
        values = extra.values[0] if hasattr(extra, "values") else extra
        PARAMS.append(pytest.param(cmd, values, marks=marks, id=f"{cmd} {' '.join(v[:20] for v in values)}"))


@pytest.mark.parametrize("cmd, extra", PARAMS)
def test_hostile_argument_exits_2_with_one_line(files, tmp_path, capsys, cmd, extra):
    argv = with_options(base(cmd, files, tmp_path), [v.replace("{d}", str(files)) for v in extra])
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not any(tmp_path.iterdir()), "nothing is written"


@pytest.mark.parametrize("cmd", list(CASES))
def test_the_same_commands_work_with_sane_arguments(files, tmp_path, capsys, cmd):
    """The control: each hostile case differs from a command that succeeds by its one option."""
    assert main(base(cmd, files, tmp_path)) == 0, capsys.readouterr().err


def test_missing_output_folders_are_created(files, tmp_path, capsys):
    out = tmp_path / "new" / "deeper"
    assert main(with_options(base("calibrate", files, tmp_path), ["--out", f"{out}/c.safetensors"])) == 0
    assert (out / "c.safetensors").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_any_work(files, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(with_options(base("train", files, tmp_path), ["--out", f"{locked}/w.safetensors"])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "read-only" in err
    finally:
        locked.chmod(0o755)
