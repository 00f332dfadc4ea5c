"""Load: simulated users running prompts through `gradio_client` against a served studio.

    python -m bench.load.run                            # 20 users for 60 s, 32 new tokens -> bench/load/results.json
    python -m bench.load.run --users 2 --seconds 5 --out DIR
    python -m bench.load.run --table bench/load/results.json

The studio runs as its own process (`python app.py`, a fresh SQLite file, offline) on the shipped demo models;
the demo recipe `assets/recipes/prose-code-token.yaml` is saved once and every user then calls `/generate` on
it in a loop (greedy, a prompt from a small prose and code list), each user with its own client and session,
starting no new request after the time is up. Latency is measured in the client, from the call to its result;
the server's generation gate (`/server_status`) says how many requests had to wait for a turn and how many
were refused, and /proc gives the server's CPU time."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO / "assets" / "recipes" / "prose-code-token.yaml"
PROMPTS = [
    "To be, or not to be, that is the question:",
    "def main(argv):",
    "Now is the winter of our discontent",
    "import os\nfor name in os.listdir(path):",
    "O Romeo, Romeo, wherefore art thou",
    "class Parser:\n    def",
    "All the world's a stage,",
    "    return sorted(items, key=",
]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def demo_recipe_text() -> str:
    """The demo recipe with its model paths as the studio stores them (relative to the repository)."""
    from studio.engine import StudioConfig, StudioEngine

    return StudioEngine(StudioConfig(db_url="sqlite://")).recipe_from_file(DEMO_RECIPE).to_yaml()


def prompt_lengths(tokenizer_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {p: len(tok(p)["input_ids"]) for p in PROMPTS}


def run_load(
    url: str, version_id: int, users: int, seconds: float, new_tokens: int, prompt_tokens: dict[str, int]
) -> dict:
    """`users` threads, each with its own client, calling /generate until `seconds` have passed."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(users)]  # connecting is not part of the load
    start = threading.Barrier(users + 1)
    records: list[dict] = []
    lock = threading.Lock()
    deadline = [0.0]

    def user(i: int) -> None:
        client = clients[i]
        n = 0
        start.wait()
        while time.monotonic() < deadline[0]:
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            n += 1
            t0 = time.monotonic()
            try:
                out = client.predict(version_id, prompt, new_tokens, False, api_name="/generate")
                rec = {"ok": True, "new_tokens": len(out["trace"]["token_ids"]) - prompt_tokens[prompt] + 1}
            except Exception as exc:  # counted and reported: the benchmark's first figure is "zero errors"
                rec = {"ok": False, "error": str(exc)[:300]}
            rec.update(user=i, start=t0, latency_s=time.monotonic() - t0)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    t_start = time.monotonic()
    deadline[0] = t_start + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    ok = [r for r in records if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["new_tokens"] for r in ok)
    return {
        "users": users,
        "seconds": seconds,
        "new_tokens": new_tokens,
        "elapsed_s": round(elapsed, 2),
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_messages": sorted({r["error"] for r in records if not r["ok"]})[:10],
        "latency_s": {
            "p50": round(percentile(lat, 50), 3),
            "p95": round(percentile(lat, 95), 3),
            "max": round(max(lat), 3) if lat else None,
            "mean": round(statistics.fmean(lat), 3) if lat else None,
        },
        "throughput": {
            "requests_per_s": round(len(ok) / elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1),
            "new_tokens_total": tokens,
        },
        "requests_per_user": [sum(1 for r in records if r["user"] == i) for i in range(users)],
    }


def server_status(url: str) -> dict:
    from gradio_client import Client

    return Client(url, verbose=False).predict(api_name="/server_status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_cpu_seconds() -> float:
    """CPU time all processes of the machine spent, in seconds (Linux /proc/stat: every state but idle and
    iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def serve(port: int, db: Path, log: Path, concurrency: int | None) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_SERVER_PORT": str(port),
        "MANGO_DB_URL": f"sqlite:///{db}",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    if concurrency:
        env["MANGO_GENERATION_CONCURRENCY"] = str(concurrency)
    return subprocess.Popen(
        [sys.executable, "app.py"], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url + "config", timeout=5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the studio did not start") from None
            time.sleep(0.5)


def environment() -> dict:
    import gradio
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gradio": gradio.__version__,
        "date": date.today().isoformat(),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="MANGO_GENERATION_CONCURRENCY for the server (default: the studio's own, 1)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--table", type=Path, help="print a results file as the README's table and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return None

    work = Path(tempfile.mkdtemp(prefix="mango-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = serve(port, work / "studio.db", work / "server.log", args.concurrency)
    try:
        wait_ready(url, proc)
        from gradio_client import Client

        admin = Client(url, verbose=False)
        version = admin.predict(demo_recipe_text(), "load benchmark", api_name="/save_recipe")
        t0 = time.monotonic()
        admin.predict(version["id"], PROMPTS[0], args.new_tokens, False, api_name="/generate")
        first = time.monotonic() - t0  # includes building the model into the cache
        lengths = prompt_lengths(REPO / "assets" / "models" / "mango-bard")
        load_before = os.getloadavg()
        cpu0, machine0, own0 = cpu_seconds(proc.pid), machine_cpu_seconds(), own_cpu_seconds()
        result = run_load(url, version["id"], args.users, args.seconds, args.new_tokens, lengths)
        cpu1, machine1, own1 = cpu_seconds(proc.pid), machine_cpu_seconds(), own_cpu_seconds()
        elapsed = result["elapsed_s"]
        status = server_status(url)
        result.update(
            {
                "recipe": DEMO_RECIPE.relative_to(REPO).as_posix(),
                "first_request_s": round(first, 2),
                "server": {
                    "generation_gate": status["generation"],
                    "cached_models": status["cached_models"],
                    "cpu_seconds": round(cpu1 - cpu0, 1),
                    "cpu_cores_busy": round((cpu1 - cpu0) / elapsed, 2),
                },
                "clients_cpu_cores_busy": round((own1 - own0) / elapsed, 2),
                # what else ran on the machine meanwhile (another job's training, say), in cores
                "other_processes_cpu_cores_busy": round(
                    ((machine1 - machine0) - (cpu1 - cpu0) - (own1 - own0)) / elapsed, 2
                ),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "env": environment(),
                "command": "python -m bench.load.run"
                + (f" --users {args.users}" if args.users != 20 else "")
                + (f" --seconds {args.seconds:g}" if args.seconds != 60 else "")
                + (f" --concurrency {args.concurrency}" if args.concurrency else ""),
            }
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "results.json"
    runs = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    key = (result["users"], result["server"]["generation_gate"]["capacity"])
    runs = [r for r in runs if (r["users"], r["server"]["generation_gate"]["capacity"]) != key] + [result]
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(markdown({"runs": runs}))
    return out


def markdown(results: dict) -> str:
    lines = [
        "| users | concurrency limit | requests | errors | p50 latency | p95 latency | requests/s | tokens/s "
        "| waited for a turn (peak waiting) | server CPU (cores) | other processes (cores) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results["runs"]:
        g = r["server"]["generation_gate"]
        lines.append(
            f"| {r['users']} | {g['capacity']} | {r['completed']} | {r['errors']} | "
            f"{r['latency_s']['p50']:.2f} s | {r['latency_s']['p95']:.2f} s | "
            f"{r['throughput']['requests_per_s']:.2f} | {r['throughput']['tokens_per_s']:.0f} | "
            f"{g['queued']} ({g['peak_waiting']}) | {r['server']['cpu_cores_busy']:.2f} | "
            f"{r.get('other_processes_cpu_cores_busy', float('nan')):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
