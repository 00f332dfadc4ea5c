"""Data-parallel training and evaluation on real processes (torchrun, gloo on CPU, 127.0.0.1 only): two processes
with batch B train the weights one process trains with batch 2B, also as two "nodes" and across a resume; a
sharded evaluation writes the report of one process; the split loss terms add up to the whole batch's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mol
from mol.cli import main
from tests.studio_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PROSE = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings. " * 30
)
CODE = (
    "def main(argv):\n    return sorted(argv, key=len)\nimport os\nfor line in open(path):\n    print(line)\n"
    * 30
)
# Every loss term on (Switch load balancing, z-loss, distillation), mixed rows, gradient accumulation: each one
# must add up over the processes exactly as over one batch. Random routers, so the experts' loads differ by row.
TRAIN = [
    "--steps",
    "3",
    "--grad-accum",
    "2",
    "--seq-len",
    "32",
    "--warmup",
    "2",
    "--device",
    "cpu",
    "--router-init",
    "random",
    "--aux-loss-weight",
    "0.5",
    "--z-loss-weight",
    "0.1",
    "--mixed-share",
    "0.5",
    "--distill-weight",
    "0.5",
    "--expert",
    "prose=a",
    "--expert",
    "code=b",
]
TIMEOUT = 240  # seconds for one launch (a few when idle)
# Measured 6e-8 (float reassociation of the sums); a rank's Switch loss from its own rows only gives 5e-3.
ATOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("dp")
    (d / "prose.txt").write_text(PROSE)
    (d / "code.py").write_text(CODE)
    recipe = mol.Recipe.from_dict(
        {
            "name": "tiny-dp",
            "base": "a",
            "models": {"a": str(tiny("llama")), "b": str(tiny("gpt_neox", width=48))},
            "slots": [
                "a:0",
                {"experts": ["a:1", "b:1"]},
                {"experts": ["a:2", "b:2"], "router": "pooled"},
                "a:3",
            ],
        }
    )
    (d / "r.yaml").write_text(recipe.to_yaml())
    return d


def data(d: Path) -> list[str]:
    return ["--data", f"prose={d / 'prose.txt'}", "--data", f"code={d / 'code.py'}"]


def _env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def launch(*commands: list[str], cwd: Path) -> list[tuple[str, str]]:
    """Run launcher commands side by side (each in its own process group, killed whole on timeout); returns
    each one's (stdout, stderr) once all succeeded."""
    procs = [
        subprocess.Popen(
            c,
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for c in commands
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"{p.args}\n{out}\n{err[-4000:]}"
    return outputs


def torchrun(*args: str, nproc: int = 2, nodes: int = 1, port: int | None = None) -> list[str]:
    where = (
        ["--master-addr", "127.0.0.1", "--master-port", str(port or free_port())]
        if nodes == 1
        else [
            "--nnodes",
            str(nodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "t",
        ]
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *where,
        "-m",
        "mol",
        *args,
    ]


def trainable(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def alone(work):
    """One process, batch 4: the run two processes of batch 2 must reproduce."""
    out = work / "one.safetensors"
    assert (
        main(
            [
                "train",
                str(work / "r.yaml"),
                *data(work),
                *TRAIN,
                "--batch-size",
                "4",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_two_processes_train_the_weights_of_one_with_twice_the_batch(work, alone):
    out = work / "two.safetensors"
    [(stdout, stderr)] = launch(
        torchrun("train", str(work / "r.yaml"), *data(work), *TRAIN, "--batch-size", "2", "--out", str(out)),
        cwd=work,
    )
    assert max_diff(trainable(out), trainable(alone)) < ATOL
    run, one = (json.loads(p.with_name(p.stem + ".train.json").read_text()) for p in (out, alone))
    assert run["world_size"] == 2 and run["metrics"]["tokens"] == one["metrics"]["tokens"] == 3 * 2 * 4 * 32
    for a, b in zip(run["curve"], one["curve"], strict=True):  # the global batch's losses, on every step
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["aux_loss"] == pytest.approx(
            b["aux_loss"], abs=1e-4
        )
    assert stdout.count("trained 3 steps") == 1  # rank 0 prints; and shows the only progress bar
    assert stderr.count("?step/s]") == 1, stderr  # a bar's first line (before any step)

    # The comparison can fail: the same two processes are not one process with their own batch of 2.
    small = work / "small.safetensors"
    assert (
        main(
            [
                "train",
                str(work / "r.yaml"),
                *data(work),
                *TRAIN,
                "--batch-size",
                "2",
                "--no-progress",
                "--out",
                str(small),
            ]
        )
        == 0
    )
    assert max_diff(trainable(small), trainable(out)) > 100 * ATOL


def test_two_nodes_then_a_resume_on_one_node_give_the_weights_of_one_process(work, alone):
    out = work / "nodes.safetensors"
    args = [
        "train",
        str(work / "r.yaml"),
        *data(work),
        *TRAIN,
        "--batch-size",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    args[args.index("--steps") + 1] = "2"
    port = free_port()
    launch(
        *[torchrun(*args, nproc=1, nodes=2, port=port) for _ in range(2)], cwd=work
    )  # two agents, one rendezvous
    assert json.loads(out.with_name("nodes.train.json").read_text())["step"] == 2
    args[args.index("--steps") + 1] = "3"
    launch(torchrun(*args, "--resume"), cwd=work)
    assert max_diff(trainable(out), trainable(alone)) < ATOL
    run = json.loads(out.with_name("nodes.train.json").read_text())
    assert [p["step"] for p in run["curve"]] == [1, 2, 3] and run["world_size"] == 2


def _flat(value, key=()):
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flat(item, (*key, name)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, (*key, i)).items()}
    return {key: value}


def test_evaluation_on_two_processes_writes_the_report_of_one(work, alone):
    # 150 tokens: 7 windows of 24 (the last one padded), 3 batches of 3 windows: two on rank 0, one on rank 1
    args = [
        "eval",
        str(work / "r.yaml"),
        *data(work),
        "--weights",
        str(alone),
        "--seq-len",
        "24",
        "--batch-size",
        "3",
        "--max-tokens",
        "150",
        "--device",
        "cpu",
        "--oracle",
    ]
    assert main([*args, "--out", str(work / "eval1")]) == 0
    [(stdout, _)] = launch(torchrun(*args, "--out", str(work / "eval2")), cwd=work)
    assert stdout.count("| tiny-dp (fused) |") == 1
    one, two = (_flat(json.loads((work / f"eval{i}.json").read_text())) for i in (1, 2))
    assert one.keys() == two.keys() and any(k[-1] == "agreement" or "load" in k for k in one)
    for k, v in one.items():  # measured: identical bytes (the same batches, losses added in the same order)
        assert two[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k


def test_accelerate_launch_trains_the_same_weights(work, alone):
    """accelerate's multi-process launcher is torchrun underneath (`--cpu` alone starts one process)."""
    out = work / "accelerate.safetensors"
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "mol",
            "train",
            str(work / "r.yaml"),
            *data(work),
            *TRAIN,
            "--batch-size",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ],
        cwd=work,
    )
    assert max_diff(trainable(out), trainable(alone)) < ATOL


def test_split_loss_terms_add_up_to_the_whole_batch(work, monkeypatch):
    """In one process, two halves of a batch with their statistics summed (as the all-reduce does) give the
    whole batch's losses and gradient; the mean of the halves' own Switch losses does not."""
    from mol import distributed
    from mol.data import TrainBatches, load_domains, tokenize_domains
    from mol.training import loss_shares

    model = mol.build(mol.Recipe.from_file(work / "r.yaml"), device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for slot in model.routed_slots:
            slot.router.proj.weight.normal_(0, 0.5)
    tokens = tokenize_domains(model.tokenizer, load_domains(data(work)[1::2]))
    ids = TrainBatches(tokens, 32, 4, seed=1).batch(0)[0][[0, 2, 1, 3]]  # prose rows, then code rows
    params = [p for p in model.trainable_parameters().values() if p.requires_grad]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])

    whole = model(ids, labels=ids)
    ref = {"lm": whole.loss, "aux": whole.aux_loss, "z": whole.z_loss}
    ref_grad = grads(sum(ref.values()))
    halves = [model(ids[:2], labels=ids[:2]), model(ids[2:], labels=ids[2:])]
    stats = []
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: stats.append(t) or t)
    for h in halves:
        loss_shares(h)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: stats[0] + stats[1])
    parts = [loss_shares(h) for h in halves]
    for k, v in ref.items():
        assert (parts[0][k] + parts[1][k]).item() == pytest.approx(v.item(), rel=1e-5), k
    torch.testing.assert_close(
        grads(sum(parts[0][k] + parts[1][k] for k in ref)), ref_grad, rtol=1e-4, atol=1e-7
    )
    naive = (halves[0].aux_loss + halves[1].aux_loss).item() / 2
    assert abs(naive - whole.aux_loss.item()) > 1e-2  # what a plain average of per-rank losses trains on


def test_plan_says_what_each_rank_holds(work, capsys):
    assert main(["plan", str(work / "r.yaml"), "--world-size", "4"]) == 0
    assert "Data parallel over 4 ranks: each rank holds the whole model" in capsys.readouterr().out
    assert main(["plan", str(work / "r.yaml"), "--json"]) == 0
    assert "per_rank" not in json.loads(capsys.readouterr().out)
    assert main(["plan", str(work / "r.yaml"), "--json", "--world-size", "2"]) == 0
    per_rank = json.loads(capsys.readouterr().out)["per_rank"]
    assert per_rank["world_size"] == 2 and per_rank["total"] > per_rank["weights"] > 0
