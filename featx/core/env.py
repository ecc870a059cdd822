"""What a bug report needs about this machine (as `torch.utils.collect_env`, `accelerate env`): versions of
featx and its dependencies, Python, the CPU's relevant flags and thread count, what `--device auto` and
`--precision auto` resolve to here, and the CUDA devices.

    from featx.core.env import environment, format_environment
    print(format_environment(environment()))
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from featx import __version__
from featx.core.device import precision_name, resolve_device, resolve_precision

DEPENDENCIES = (
    "torch",
    "torchvision",
    "h5py",
    "numpy",
    "scikit-learn",
    "scipy",
    "joblib",
    "click",
    "tqdm",
    "matplotlib",
    "timm",
    "safetensors",
    "pytest",
)
# The flags that decide featx's speed on CPU: AVX2/AVX-512 kernels, and bf16 in hardware (avx512_bf16, AMX),
# which `--precision auto` needs before it picks bf16.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_info(cpuinfo: str) -> dict:
    """Model name and the relevant flags from /proc/cpuinfo's text (its first processor: all are alike)."""
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def environment() -> dict:
    """This machine and installation as plain JSON-able values."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    device = resolve_device("auto")
    cuda = [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]
    return {
        "featx": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in DEPENDENCIES},
        "torch_cuda": torch.version.cuda,
        "cpu": {**cpu_info(cpuinfo), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "auto": {"device": str(device), "precision": precision_name(resolve_precision("auto", device))},
        "cuda_devices": cuda,
    }


def format_environment(env: dict) -> str:
    """`featx env`'s text: one `name: value` line each, ready to paste into an issue."""
    cpu, auto = env["cpu"], env["auto"]
    lines = [
        f"featx: {env['featx']}",
        f"python: {env['python']} ({env['platform']})",
        *(f"{p}: {v or 'not installed'}" for p, v in env["packages"].items()),
        f"torch built for CUDA: {env['torch_cuda'] or 'no (CPU build)'}",
        f"cpu: {cpu['model']}; {cpu['cores']} cores, torch uses {cpu['torch_threads']} threads",
        f"cpu flags: {' '.join(cpu['flags']) or 'none of ' + ', '.join(CPU_FLAGS)}",
        f"--device auto: {auto['device']}; --precision auto: {auto['precision']}",
    ]
    lines += [
        f"cuda:{d['index']}: {d['name']}, capability {d['capability']}, {d['memory_gib']} GiB"
        for d in env["cuda_devices"]
    ] or ["cuda devices: none"]
    return "\n".join(lines)
