"""Shared pieces of the performance suite: the machine's description, timing, the two hardware ceilings."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time

import torch

# Dense bf16 matrix rate by the vendor's datasheets (SXM parts), for model FLOP utilisation.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "GH200": 989.4e12}


def environment() -> dict:
    import accelerate
    import transformers

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "card": "cpu",
        "driver": None,
        "commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
        env["driver"] = _nvidia_smi("driver_version")
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _git_commit() -> str | None:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without its .git (a remote machine)
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_bf16(card: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in card), None)


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeat: int = 5, warmup: int = 1) -> dict:
    """Median and spread of wall time (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeat}


def copy_bandwidth(nbytes: int, device: str) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy (the memory-bandwidth ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeat=10, warmup=3)["median_s"]
    return 2 * nbytes / t


def matmul_rate(n: int, device: str, dtype=torch.bfloat16) -> float:
    """FLOP/s of an n×n×n matrix product on random data (the arithmetic ceiling)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, repeat=10, warmup=3)["median_s"]
    return 2 * n**3 / t


def gpu_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
