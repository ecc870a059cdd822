"""What every benchmark shares: run one side in a fresh process and measure its wall time, CPU and peak RSS.

A side is this same script re-run with arguments that make it do one thing and print one JSON line. Peak RSS
is the largest sum over the side's process tree (worker processes included), sampled from /proc every 10 ms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_ZIP = SHARED / "data" / "tiny-imagenet-200-train100.zip"
SHARED_WEIGHTS = SHARED / "weights"


def sample_tree(pid: int, cpu: dict[int, int]) -> int:
    """Resident bytes of pid and all its descendants; records each one's CPU ticks so far in cpu."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu[p] = int(stat[11]) + int(stat[12])  # utime + stime
            total += int(status.split("VmRSS:")[1].split()[0]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass  # exited meanwhile, or a zombie without VmRSS
    return total


def measure(script: str, args: list[str]) -> dict:
    """Run `python script *args`, whose last stdout line is a JSON dict; add peak_rss (bytes) and cpu (s)."""
    child = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    peak, cpu = 0, {}
    while child.poll() is None:
        peak = max(peak, sample_tree(child.pid, cpu))
        time.sleep(0.01)
    out = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"{Path(script).name} {' '.join(args)}: failed with status {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss": peak, "cpu": sum(cpu.values()) / os.sysconf("SC_CLK_TCK")}


def matmul_peak_gflops(n: int = 2048, repeat: int = 5, dtype: str = "fp32") -> float:
    """This machine's matrix-multiply rate in fp32 or bf16, best of `repeat`. No convolution or linear layer
    computes faster in that precision, so it bounds what a side running in it can reach."""
    import torch

    a = torch.randn(n, n, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    a @ a
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def matmul_peaks() -> dict[str, float]:
    """The fp32 matmul peak, and the bf16 one where the CPU has bf16 instructions."""
    from featx.core.device import cpu_has_bf16

    return {p: matmul_peak_gflops(dtype=p) for p in ("fp32", *(("bf16",) if cpu_has_bf16() else ()))}


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions that decide its precision, as `featx env` lists them."""
    from featx.core.env import environment

    return " ".join(environment()["cpu"]["flags"]) or "no AVX2"


def machine() -> str:
    return f"{os.cpu_count()} cores ({cpu_flags()}), load average {os.getloadavg()[0]:.1f}"
